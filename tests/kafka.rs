//! The `kafka` backend end to end, against a real Kafka-protocol broker, `tansu` (scripts/setup.sh
//! builds it), that this test starts on a free loopback port with its own SQLite storage, read
//! back by Confluent's Python client and parsed by the CloudEvents SDK's Kafka binding
//! (tests/clients/consume_kafka.py): every attribute in binary and structured mode, the
//! partition key as the record's key; an event for a topic that does not exist dead while
//! others flow; the broker killed and restarted mid-drain with nothing lost; SASL/SCRAM with a
//! password from a user mapping; TLS with a client certificate, through a TLS terminator in front
//! of tansu (which serves no TLS itself).

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
    /// Set: clients reach the broker only through TLS, see [`TlsFront`].
    tls: Option<TlsFront>,
    child: Option<Child>,
}

/// TLS in front of a tansu broker, which serves none itself (0.6.0 reads `--cert` and `--key`
/// but never uses them): socat, as a TLS-terminating proxy would, accepts TLS on a port of its
/// own with the server certificate of [`common::make_certificates`], requires a client
/// certificate of that CA, and passes each connection on to tansu. tansu advertises socat's
/// port, so that every connection a client makes (bootstrap, then each broker's) is TLS.
struct TlsFront {
    /// The certificates' folder.
    dir: PathBuf,
    port: u16,
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
            tls: None,
            child: None,
        };
        broker.run();
        broker
    }

    /// Where clients connect: tansu, or its TLS front.
    fn address(&self) -> String {
        let port = self.tls.as_ref().map_or(self.port, |tls| tls.port);
        format!("127.0.0.1:{port}")
    }

    fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "kafka+ssl"
        } else {
            "kafka"
        };
        format!("{scheme}://{}", self.address())
    }

    fn run(&mut self) {
        let listener = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = format!("tcp://{}", self.address());
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
                &advertised,
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
        if let Some(tls) = self.tls.as_mut().filter(|tls| tls.child.is_none()) {
            let file = |f: &str| tls.dir.join(f).to_string_lossy().into_owned();
            let listen = format!(
                "OPENSSL-LISTEN:{},bind=127.0.0.1,reuseaddr,fork,cert={},key={},cafile={},verify=1",
                tls.port,
                file("server.pem"),
                file("server.key"),
                file("ca.pem"),
            );
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.join("socat.log"))
                .expect("socat.log");
            tls.child = Some(
                Command::new("socat")
                    .args([listen, format!("TCP:127.0.0.1:{}", self.port)])
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .expect("socat is installed (scripts/setup.sh)"),
            );
            let port = tls.port;
            wait_for("socat to listen", DEADLINE, || {
                std::net::TcpStream::connect(("127.0.0.1", port))
                    .ok()
                    .map(drop)
            });
        }
    }

    /// From now on, clients reach the broker only through TLS with a client certificate (the
    /// certificates of [`common::make_certificates`] in `dir`); takes effect at [`Self::restart`].
    fn require_tls(&mut self, dir: PathBuf) {
        self.tls = Some(TlsFront {
            dir,
            port: common::free_port(),
            child: None,
        });
    }

    /// A tansu command against this broker (`topic create ...`, `user create ...`), on its
    /// own port: never through its TLS front.
    fn admin(&self, args: &[&str]) {
        let broker = format!("tcp://127.0.0.1:{}", self.port);
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
        if let Some(tls) = &self.tls {
            command.env("KAFKA_TLS_DIR", &tls.dir);
        }
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
        if let Some(mut front) = self.tls.as_mut().and_then(|tls| tls.child.take()) {
            let _ = front.kill();
            let _ = front.wait();
        }
        if std::thread::panicking() {
            for (name, file) in [("tansu", "broker.log"), ("socat", "socat.log")] {
                let log = std::fs::read_to_string(self.dir.join(file)).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!("---- {name}'s log, last lines ----");
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
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
    let data = common::EVERY_ATTRIBUTE_DATA;
    let mut ids = HashMap::new();
    for backend in ["kbin", "kstr"] {
        let id = common::insert_every_attribute(&mut c, backend);
        ids.insert(backend, id);
    }
    common::wait_drained(&mut c);
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
    common::wait_drained(&mut c);
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
        let (attempts, error) = common::wait_dead(&mut c, id);
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
        (common::pending(&mut c) < 500).then_some(())
    });
    broker.kill();
    for chunk in 6..16 {
        commit(&mut c, chunk);
    }
    // Away for longer than the client waits for a record on its own (twice network_timeout,
    // 4 s; a refused connection is an outage at once anyway), so that the relay meets it.
    std::thread::sleep(std::time::Duration::from_secs(6));
    let pending_at_restart = common::pending(&mut c);
    broker.restart();
    for chunk in 16..20 {
        commit(&mut c, chunk);
    }
    assert!(
        pending_at_restart >= 1000,
        "{pending_at_restart} events waited for the broker"
    );
    common::wait_drained(&mut c);
    let records = broker.records("orders.all", TOTAL, None);
    let delivered = ids_in_offset_order(&records);
    let tally = Tally::count(&produced, &delivered);
    // A batch sent again after an outage may land twice (a new producer session), with its id.
    tally.assert_none_lost("kafka, broker killed mid-drain");
    assert!(
        s.cluster.log().contains("broker unavailable"),
        "the relay met the killed broker"
    );
    // Each key in one partition, in commit order there.
    for key in order.keys() {
        let partitions: HashSet<i32> = records
            .iter()
            .filter(|r| r.key.as_deref() == Some(key.as_str()))
            .map(|r| r.partition)
            .collect();
        assert_eq!(partitions.len(), 1, "key {key} in {partitions:?}");
    }
    common::assert_commit_order(&delivered, &order);
}

/// The relay's password on the broker of [`Broker::with_login`].
const PASSWORD: &str = "s3cret-kafka-pw";

impl Broker {
    /// A broker with topic `topic` (one partition) requiring a SASL/SCRAM login, user `relay`
    /// with [`PASSWORD`]; reached through TLS only when `tls` names the certificates' folder.
    /// The user and topic are made first, then the broker restarted requiring a login: tansu
    /// takes no administration from a client that has not logged in.
    fn with_login(topic: &str, tls: Option<PathBuf>) -> Broker {
        let mut broker = Broker::start();
        broker.create_topic(topic, 1);
        broker.admin(&["user", "create", "relay", PASSWORD]);
        broker.authentication = true;
        if let Some(dir) = tls {
            broker.require_tls(dir);
        }
        broker.restart();
        broker
    }
}

/// The login test's cluster: outages retried within a second, the Kafka client's bounds short.
fn login_setup() -> common::Setup {
    setup(&[
        ("broadcaster.poll_interval", "200ms"),
        ("broadcaster.retry_max_delay", "1s"),
        ("broadcaster.network_timeout", "1s"),
    ])
}

/// Server `good` delivers to `topic`; server `refused`'s event is an outage, nothing counted,
/// until `fix` (SQL) mends its configuration; then both events are in `topic` once each, in
/// order, and no password of `passwords` is in the log.
fn refused_until_fixed(
    broker: &Broker,
    s: &common::Setup,
    topic: &str,
    (good, refused): (&str, &str),
    fix: &str,
    passwords: &[&str],
) {
    let mut c = s.cluster.connect();
    let id = publish(&mut c, good, None);
    let login = Some(("relay", PASSWORD));
    let records = broker.records(topic, 1, login);
    assert_eq!(records[0].id(), id);
    let waiting = publish(&mut c, refused, None);
    common::wait_outage(&s.cluster, refused);
    assert_eq!(
        common::failures(&mut c),
        0,
        "{refused}: an outage, no event's fault"
    );
    assert_eq!(common::pending(&mut c), 1, "{waiting} waits for {fix}");
    c.batch_execute(fix).expect("the fix");
    common::wait_drained(&mut c);
    let records = broker.records(topic, 2, login);
    assert_eq!(
        ids_in_offset_order(&records),
        vec![id, waiting],
        "each once, in order"
    );
    let log = s.cluster.log();
    for password in passwords {
        assert!(!log.contains(password), "passwords stay out of the log");
    }
}

#[test]
fn sasl_scram_with_a_password_from_a_user_mapping() {
    let broker = Broker::with_login("secure.k", None);
    let s = login_setup();
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
    // A wrong password: the broker refuses the login. Fixed in the user mapping.
    refused_until_fixed(
        &broker,
        &s,
        "secure.k",
        ("k", "wrong"),
        &format!(
            "ALTER USER MAPPING FOR PUBLIC SERVER wrong
               OPTIONS (SET url 'kafka://relay:{PASSWORD}@{address}')"
        ),
        &[PASSWORD, "nope-kafka-pw"],
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

#[test]
fn tls_with_a_client_certificate_and_sasl_scram_from_a_user_mapping() {
    let dir = std::env::temp_dir().join(format!("bc-kafka-tls-{}", std::process::id()));
    common::make_certificates(&dir);
    let path = |f: &str| dir.join(f).to_string_lossy().into_owned();
    let broker = Broker::with_login("secure.t", Some(dir.clone()));
    let s = login_setup();
    let mut c = s.cluster.connect();
    let (url, address) = (broker.url(), broker.address());
    let ca = format!("tls_ca_file '{}'", path("ca.pem"));
    let identity = format!(
        "tls_cert_file '{}', tls_key_file '{}'",
        path("client.pem"),
        path("client.key")
    );
    for (name, files) in [("k", format!("{ca}, {identity}")), ("nocert", ca)] {
        c.batch_execute(&format!(
            "CREATE SERVER {name} FOREIGN DATA WRAPPER broadcaster
               OPTIONS (backend 'kafka', url '{url}', stream 'secure.t', {files});
             CREATE USER MAPPING FOR PUBLIC SERVER {name}
               OPTIONS (url 'kafka+ssl://relay:{PASSWORD}@{address}')"
        ))
        .expect("server");
    }
    // Without its certificate the relay gets no TLS session. Given it with ALTER SERVER.
    refused_until_fixed(
        &broker,
        &s,
        "secure.t",
        ("k", "nocert"),
        &format!(
            "ALTER SERVER nocert OPTIONS (ADD tls_cert_file '{}', ADD tls_key_file '{}')",
            path("client.pem"),
            path("client.key")
        ),
        &[PASSWORD],
    );
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}
