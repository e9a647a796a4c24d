//! The `kafka` backend end to end, against a real Kafka-protocol broker, `tansu` (scripts/setup.sh
//! builds it), that this test starts on a free loopback port with its own SQLite storage, read
//! back by Confluent's Python client and parsed by the CloudEvents SDK's Kafka binding
//! (tests/clients/consume_kafka.py): every attribute in binary and structured mode, the
//! partition key as the record's key; an event for a topic that does not exist dead while
//! others flow; the broker killed and restarted mid-drain with nothing lost; SASL/SCRAM with a
//! password from a user mapping.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use common::{wait_for, PgClient, Tally, DEADLINE};

/// The tansu binary: `BROADCASTER_TANSU`, or where scripts/setup.sh installs it.
fn tansu_binary() -> String {
    std::env::var("BROADCASTER_TANSU").unwrap_or_else(|_| "/opt/broadcaster-tansu/bin/tansu".into())
}

/// A tansu broker on a free loopback port, keeping its topics and records in a SQLite file of
/// its own folder, so that a restart keeps what it acknowledged.
struct Broker {
    port: u16,
    dir: PathBuf,
    authentication: bool,
    child: Option<Child>,
}

impl Broker {
    fn start() -> Broker {
        let port = common::free_port();
        let dir = std::env::temp_dir().join(format!("bc-kafka-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("broker dir");
        let mut broker = Broker {
            port,
            dir,
            authentication: false,
            child: None,
        };
        broker.run();
        broker
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn url(&self) -> String {
        format!("kafka://{}", self.address())
    }

    fn run(&mut self) {
        let listener = format!("tcp://{}", self.address());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("broker.log"))
            .expect("broker.log");
        let mut command = Command::new(tansu_binary());
        command
            .current_dir(&self.dir)
            .args([
                "broker",
                "--silent",
                "--storage-engine",
                "sqlite://tansu.db",
            ])
            .args([
                "--listener-url",
                &listener,
                "--advertised-listener-url",
                &listener,
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log);
        if self.authentication {
            command.arg("--authentication");
        }
        self.child = Some(
            command
                .spawn()
                .expect("tansu is installed (scripts/setup.sh)"),
        );
        wait_for("tansu to listen", DEADLINE, || {
            std::net::TcpStream::connect(("127.0.0.1", self.port))
                .ok()
                .map(drop)
        });
    }

    /// A tansu command against this broker (`topic create ...`, `user create ...`).
    fn admin(&self, args: &[&str]) {
        let broker = format!("tcp://{}", self.address());
        let out = Command::new(tansu_binary())
            .args(args)
            .args(["--broker", &broker])
            .output()
            .expect("tansu runs");
        assert!(out.status.success(), "tansu {args:?}: {out:?}");
    }

    fn create_topic(&self, topic: &str, partitions: u32) {
        self.admin(&[
            "topic",
            "create",
            topic,
            "--partitions",
            &partitions.to_string(),
        ]);
    }

    /// SIGKILL: what the broker acknowledged must survive it.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn restart(&mut self) {
        self.kill();
        self.run();
    }

    /// Every record of `topic` as the test's consumer read it, once at least `count` are there
    /// and each partition has been read to its end.
    fn records(&self, topic: &str, count: usize, login: Option<(&str, &str)>) -> Vec<Record> {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/clients/consume_kafka.py"
        );
        let mut command = Command::new("python3");
        command
            .arg(script)
            .args([&self.address(), topic, &count.to_string(), "60"]);
        if let Some((user, password)) = login {
            command.args([user, password]);
        }
        let out = command.output().expect("python3 runs");
        assert!(
            out.status.success(),
            "consume_kafka.py: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let records: Vec<Record> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|line| serde_json::from_str(line).expect("a JSON line"))
            .collect();
        assert!(
            records.len() >= count,
            "{} records in {topic}, {count} expected",
            records.len()
        );
        records
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.join("broker.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("---- tansu's log, last lines ----");
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One record as the consumer read it, and the event the SDK made of it.
#[derive(Debug, serde::Deserialize)]
struct Record {
    partition: i32,
    offset: i64,
    key: Option<String>,
    headers: HashMap<String, Option<String>>,
    value: String,
    attributes: HashMap<String, String>,
}

impl Record {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.as_deref())
    }

    fn id(&self) -> String {
        self.attributes.get("id").cloned().unwrap_or_default()
    }
}

/// The ids of `records` in the order the consumer saw them within each partition: (partition,
/// offset) order.
fn ids_in_offset_order(records: &[Record]) -> Vec<String> {
    let mut sorted: Vec<&Record> = records.iter().collect();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    sorted.iter().map(|r| r.id()).collect()
}

fn setup(settings: &[(&str, &str)]) -> common::Setup {
    common::Setup::new(settings)
}

fn create_kafka_server(c: &mut PgClient, name: &str, url: &str, options: &str) {
    c.batch_execute(&format!(
        "CREATE SERVER {name} FOREIGN DATA WRAPPER broadcaster \
           OPTIONS (backend 'kafka', url '{url}'{options})"
    ))
    .expect("create kafka server");
}

fn publish(c: &mut PgClient, backend: &str, key: Option<&str>) -> String {
    c.query_one(
        "SELECT broadcaster_publish('t', '{}'::json, partition_key => $1, backend => $2)::text",
        &[&key, &backend],
    )
    .expect("publish")
    .get(0)
}

fn pending(c: &mut PgClient) -> i64 {
    c.query_one("SELECT count(*) FROM broadcaster_outbox", &[])
        .expect("count")
        .get(0)
}

fn wait_drained(c: &mut PgClient) {
    wait_for("the outbox drained", DEADLINE, || {
        (pending(c) == 0).then_some(())
    });
}

#[test]
fn every_attribute_arrives_in_binary_and_structured_mode_keyed_by_partition_key() {
    let broker = Broker::start();
    broker.create_topic("orders.bin", 3);
    broker.create_topic("orders.str", 3);
    let s = setup(&[]);
    let mut c = s.cluster.connect();
    create_kafka_server(&mut c, "kbin", &broker.url(), ", stream 'orders.bin'");
    create_kafka_server(
        &mut c,
        "kstr",
        &broker.url(),
        ", stream 'orders.str', message_mode 'structured'",
    );
    let data = r#"{"b": 1, "a": [1.50, "x"], "big": 12345678901234567890}"#;
    let mut ids = HashMap::new();
    for backend in ["kbin", "kstr"] {
        let id: String = c
            .query_one(
                "INSERT INTO broadcaster_outbox (type, source, subject, dataschema, data,
                    partition_key, extensions, backend)
                 VALUES ('order.created', '/shop', 'Zürich 100%', 'https://example.com/order.json',
                    $1::text::json, 'o-1', '{\"tenant\": \"acme\", \"priority\": 3}', $2)
                 RETURNING id::text",
                &[&data, &backend],
            )
            .expect("insert")
            .get(0);
        ids.insert(backend, id);
    }
    wait_drained(&mut c);
    let bin = broker.records("orders.bin", 1, None);
    let structured = broker.records("orders.str", 1, None);
    assert_eq!((bin.len(), structured.len()), (1, 1), "one record each");
    let (bin, structured) = (&bin[0], &structured[0]);
    assert_eq!(bin.header("ce_id"), Some(ids["kbin"].as_str()));
    assert_eq!(bin.header("ce_specversion"), Some("1.0"));
    assert_eq!(
        bin.header("ce_subject"),
        Some("Zürich 100%"),
        "UTF-8, as it is"
    );
    assert_eq!(bin.header("content-type"), Some("application/json"));
    assert_eq!(bin.value, data, "the stored text, unchanged");
    assert_eq!(
        structured.header("content-type"),
        Some("application/cloudevents+json; charset=UTF-8")
    );
    for (backend, record) in [("kbin", bin), ("kstr", structured)] {
        assert_eq!(record.key.as_deref(), Some("o-1"), "{backend}: the key");
        let a = |name: &str| record.attributes.get(name).map(String::as_str);
        assert_eq!(a("id"), Some(ids[backend].as_str()), "{backend}");
        assert_eq!(a("type"), Some("order.created"));
        assert_eq!(a("source"), Some("/shop"));
        assert_eq!(a("specversion"), Some("1.0"));
        assert_eq!(a("datacontenttype"), Some("application/json"), "{backend}");
        assert!(a("time").is_some(), "{backend}: time");
        assert_eq!(a("subject"), Some("Zürich 100%"), "{backend}");
        assert_eq!(a("dataschema"), Some("https://example.com/order.json"));
        assert_eq!(a("tenant"), Some("acme"), "{backend}");
        assert_eq!(a("priority"), Some("3"), "{backend}");
        assert_eq!(a("partitionkey"), Some("o-1"), "{backend}");
    }
    // The key decides the partition, as the Java client hashes it: one key, one partition.
    let ids: Vec<String> = (0..30)
        .map(|_| publish(&mut c, "kbin", Some("o-2")))
        .collect();
    wait_drained(&mut c);
    let records = broker.records("orders.bin", 31, None);
    let partitions: HashSet<i32> = records
        .iter()
        .filter(|r| r.key.as_deref() == Some("o-2"))
        .map(|r| r.partition)
        .collect();
    assert_eq!(partitions.len(), 1, "{partitions:?}");
    let delivered: Vec<String> = ids_in_offset_order(&records)
        .into_iter()
        .filter(|id| ids.contains(id))
        .collect();
    assert_eq!(delivered, ids, "in commit order");
}

#[test]
fn an_event_for_a_topic_that_does_not_exist_goes_dead_while_others_flow() {
    let broker = Broker::start();
    broker.create_topic("orders.all", 1);
    let s = setup(&[
        ("broadcaster.max_attempts", "2"),
        ("broadcaster.poll_interval", "200ms"),
        ("broadcaster.retry_max_delay", "1s"),
        ("broadcaster.network_timeout", "1s"),
    ]);
    let mut c = s.cluster.connect();
    create_kafka_server(&mut c, "k", &broker.url(), ", stream 'orders.all'");
    let poison: String = c
        .query_one(
            "SELECT broadcaster_publish('t', '{}'::json, partition_key => 'p', \
               stream => 'orders.missing', backend => 'k')::text",
            &[],
        )
        .expect("publish")
        .get(0);
    let invalid: String = c
        .query_one(
            "SELECT broadcaster_publish('t', '{}'::json, stream => 'orders/eu', backend => 'k')::text",
            &[],
        )
        .expect("publish")
        .get(0);
    let others: Vec<String> = (0..20)
        .map(|i| publish(&mut c, "k", Some(&format!("k{i}"))))
        .collect();
    for (id, why) in [
        (&poison, "orders.missing"),
        (&invalid, "not a Kafka topic name"),
    ] {
        let (attempts, error): (i32, String) = wait_for("the event dead", DEADLINE, || {
            c.query_opt(
                "SELECT attempts, last_error FROM broadcaster_dead_events WHERE id::text = $1",
                &[id],
            )
            .ok()
            .flatten()
            .map(|r| (r.get(0), r.get(1)))
        });
        assert_eq!(attempts, 2, "{error}");
        assert!(error.contains(why), "{error}");
    }
    let records = broker.records("orders.all", others.len(), None);
    Tally::count(&others, &ids_in_offset_order(&records))
        .assert_exactly_once("kafka, poison beside");
}

#[test]
fn the_broker_killed_and_restarted_mid_drain_loses_nothing() {
    let mut broker = Broker::start();
    broker.create_topic("orders.all", 3);
    let s = setup(&[
        ("broadcaster.poll_interval", "200ms"),
        ("broadcaster.retry_max_delay", "1s"),
    ]);
    let mut c = s.cluster.connect();
    create_kafka_server(&mut c, "k", &broker.url(), ", stream 'orders.all'");
    // 2,000 events of 50 keys, 100 per transaction; the broker killed once some have been
    // written, 1,000 committed while it is away, then started again on its SQLite file.
    const TOTAL: usize = 2000;
    let mut produced = Vec::with_capacity(TOTAL);
    let mut order: HashMap<String, Vec<String>> = HashMap::new();
    let mut commit = |c: &mut PgClient, chunk: usize| {
        c.batch_execute("BEGIN").expect("begin");
        for i in 0..100 {
            let key = format!("k{}", (chunk * 100 + i) % 50);
            let id = publish(c, "k", Some(&key));
            order.entry(key).or_default().push(id.clone());
            produced.push(id);
        }
        c.batch_execute("COMMIT").expect("commit");
    };
    for chunk in 0..6 {
        commit(&mut c, chunk);
    }
    wait_for("some events delivered", DEADLINE, || {
        (pending(&mut c) < 500).then_some(())
    });
    broker.kill();
    for chunk in 6..16 {
        commit(&mut c, chunk);
    }
    // Away for longer than the client retries on its own (network_timeout, 2 s), so that the
    // relay meets the outage.
    std::thread::sleep(std::time::Duration::from_secs(5));
    let pending_at_restart = pending(&mut c);
    broker.restart();
    for chunk in 16..20 {
        commit(&mut c, chunk);
    }
    assert!(
        pending_at_restart >= 1000,
        "{pending_at_restart} events waited for the broker"
    );
    wait_drained(&mut c);
    let records = broker.records("orders.all", TOTAL, None);
    let delivered = ids_in_offset_order(&records);
    let tally = Tally::count(&produced, &delivered);
    println!(
        "| kafka, broker killed mid-drain | {} | {} | {} | {} |",
        tally.produced, tally.delivered, tally.duplicates, tally.lost
    );
    // A batch sent again after an outage may land twice (a new producer session), with its id.
    assert_eq!((tally.lost, tally.unexpected), (0, 0), "{tally:?}");
    assert!(
        s.cluster.log().contains("broker unavailable"),
        "the relay met the killed broker"
    );
    // Each key in one partition, in commit order there.
    let mut position = HashMap::new();
    for (n, id) in delivered.iter().enumerate() {
        position.entry(id.clone()).or_insert(n);
    }
    for (key, ids) in &order {
        let partitions: HashSet<i32> = records
            .iter()
            .filter(|r| r.key.as_deref() == Some(key.as_str()))
            .map(|r| r.partition)
            .collect();
        assert_eq!(partitions.len(), 1, "key {key} in {partitions:?}");
        let positions: Vec<usize> = ids.iter().map(|id| position[id]).collect();
        assert!(
            positions.windows(2).all(|w| w[0] < w[1]),
            "key {key} out of order"
        );
    }
}

/// The relay's password on the broker of [`sasl_scram_with_a_password_from_a_user_mapping`].
const PASSWORD: &str = "s3cret-kafka-pw";

#[test]
fn sasl_scram_with_a_password_from_a_user_mapping() {
    // The user and topic made first, then the broker restarted requiring a login: tansu
    // takes no administration from a client that has not logged in.
    let mut broker = Broker::start();
    broker.create_topic("secure.k", 1);
    broker.admin(&["user", "create", "relay", PASSWORD]);
    broker.authentication = true;
    broker.restart();
    let s = setup(&[
        ("broadcaster.poll_interval", "200ms"),
        ("broadcaster.retry_max_delay", "1s"),
        ("broadcaster.network_timeout", "1s"),
    ]);
    let mut c = s.cluster.connect();
    let address = broker.address();
    for (name, password) in [("k", PASSWORD), ("wrong", "nope-kafka-pw")] {
        c.batch_execute(&format!(
            "CREATE SERVER {name} FOREIGN DATA WRAPPER broadcaster
               OPTIONS (backend 'kafka', url 'kafka://{address}', stream 'secure.k');
             CREATE USER MAPPING FOR PUBLIC SERVER {name}
               OPTIONS (url 'kafka://relay:{password}@{address}')"
        ))
        .expect("server");
    }
    let id = publish(&mut c, "k", None);
    let login = Some(("relay", PASSWORD));
    let records = broker.records("secure.k", 1, login);
    assert_eq!(records[0].id(), id);
    // A wrong password: the broker refuses the login; an outage, nothing counted, and neither
    // password in the log.
    let refused = publish(&mut c, "wrong", None);
    wait_for("the refused login in the log", DEADLINE, || {
        s.cluster
            .log()
            .lines()
            .any(|l| l.contains("backend \"wrong\"") && l.contains("broker unavailable"))
            .then_some(())
    });
    let failures: i64 = c
        .query_one("SELECT count(*) FROM broadcaster_failures", &[])
        .expect("failures")
        .get(0);
    assert_eq!(failures, 0, "a refused login is no event's fault");
    assert_eq!(pending(&mut c), 1, "{refused} waits for the login to work");
    // Fixed in the user mapping: it goes out.
    c.batch_execute(&format!(
        "ALTER USER MAPPING FOR PUBLIC SERVER wrong
           OPTIONS (SET url 'kafka://relay:{PASSWORD}@{address}')"
    ))
    .expect("fix the password");
    wait_drained(&mut c);
    let records = broker.records("secure.k", 2, login);
    assert_eq!(
        ids_in_offset_order(&records),
        vec![id, refused],
        "each once, in order"
    );
    let log = s.cluster.log();
    assert!(
        !log.contains(PASSWORD) && !log.contains("nope-kafka-pw"),
        "passwords stay out of the log"
    );
    // Without a login, the broker serves nothing.
    let anonymous = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/clients/consume_kafka.py"
        ))
        .args([&address, "secure.k", "1", "5"])
        .output()
        .expect("python3 runs");
    assert!(!anonymous.status.success(), "read without a login");
}
