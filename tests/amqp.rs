//! The `amqp` backend end to end, against a real RabbitMQ node (Debian's 3.10) that this test
//! starts on free loopback ports with its own data folder: every CloudEvents attribute in
//! binary and structured mode, read back with lapin; an unroutable event (`NO_ROUTE`) dead
//! while others flow; the node SIGKILLed and restarted mid-drain with nothing lost; TLS with a
//! client certificate and a password from a user mapping.

mod common;

use std::collections::{HashMap, HashSet};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use cloudevents::AttributesReader;
use common::{wait_for, PgClient, Setup, Tally, DEADLINE};
use lapin::options::{
    BasicGetOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties, ExchangeKind};

/// RabbitMQ's own start script (the Debian wrapper would switch to the rabbitmq user).
fn rabbitmq_server_binary() -> String {
    std::env::var("BROADCASTER_RABBITMQ_SERVER")
        .unwrap_or_else(|_| "/usr/lib/rabbitmq/bin/rabbitmq-server".into())
}

/// RabbitMQ's own rabbitmqctl, beside its start script.
fn rabbitmqctl_binary() -> PathBuf {
    PathBuf::from(rabbitmq_server_binary()).with_file_name("rabbitmqctl")
}

/// The node's `max_message_size`, in bytes.
const MAX_MESSAGE: usize = 8192;

/// Names nodes apart within this process.
static NODES: AtomicU32 = AtomicU32::new(0);

/// The password of user `relay` on a node of [`Rabbit::start_secure`].
const PASSWORD: &str = "s3cret-amqp-pw";

/// A RabbitMQ node on a free loopback port, its data and Erlang cookie in a folder of its own.
struct Rabbit {
    port: u16,
    /// Its TLS listener's port, where it has one ([`Rabbit::start_secure`]).
    tls_port: Option<u16>,
    dist_port: u16,
    name: String,
    dir: PathBuf,
    child: Option<Child>,
    runtime: tokio::runtime::Runtime,
}

impl Rabbit {
    fn start() -> Rabbit {
        Self::start_with(None)
    }

    /// With a TLS listener besides the plain one, using `certificates` (those of
    /// [`common::make_certificates`]) and requiring a client certificate; the only user is
    /// `relay`, with [`PASSWORD`] (guest is not made).
    fn start_secure(certificates: &std::path::Path) -> Rabbit {
        Self::start_with(Some(certificates))
    }

    fn start_with(secure: Option<&std::path::Path>) -> Rabbit {
        let port = common::free_port();
        let n = NODES.fetch_add(1, Ordering::SeqCst);
        let name = format!("bc{}n{n}@localhost", std::process::id());
        let dir = std::env::temp_dir().join(format!("bc-rabbit-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("rabbit dir");
        std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("plugins");
        // Small enough that a test's event can be too large.
        let mut conf = format!("max_message_size = {MAX_MESSAGE}\n");
        let tls_port = secure.map(|_| common::free_port());
        if let (Some(certificates), Some(tls_port)) = (secure, tls_port) {
            let file = |f: &str| certificates.join(f).display().to_string();
            conf.push_str(&format!(
                "listeners.ssl.1 = 127.0.0.1:{tls_port}\n\
                 ssl_options.cacertfile = {}\nssl_options.certfile = {}\n\
                 ssl_options.keyfile = {}\nssl_options.verify = verify_peer\n\
                 ssl_options.fail_if_no_peer_cert = true\n\
                 default_user = relay\ndefault_pass = {PASSWORD}\n",
                file("ca.pem"),
                file("server.pem"),
                file("server.key"),
            ));
        }
        std::fs::write(dir.join("rabbitmq.conf"), conf).expect("rabbitmq.conf");
        let mut rabbit = Rabbit {
            port,
            tls_port,
            dist_port: common::free_port(),
            name,
            dir,
            child: None,
            runtime: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime"),
        };
        rabbit.run();
        rabbit
    }

    fn run(&mut self) {
        let d = &self.dir;
        let child = Command::new(rabbitmq_server_binary())
            .env("HOME", d)
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq"))
            .current_dir(d)
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("rabbitmq-server is installed (scripts/setup.sh)");
        self.child = Some(child);
        // Listening, and taking connections (it listens a moment before it serves). Each try
        // bounded: a connection made while the node starts may never be answered, and lapin
        // waits for the answer without a timeout (a test hung 24 minutes here).
        let url = self.url();
        wait_for("RabbitMQ to serve", DEADLINE, || {
            self.runtime
                .block_on(async {
                    let connect = Connection::connect(&url, ConnectionProperties::default());
                    tokio::time::timeout(Duration::from_secs(2), connect).await
                })
                .ok()?
                .ok()
                .map(drop)
        });
    }

    /// The plain listener's URL, with the node's user and password.
    fn url(&self) -> String {
        let user = match self.tls_port {
            Some(_) => format!("relay:{PASSWORD}"),
            None => "guest:guest".into(),
        };
        format!("amqp://{user}@127.0.0.1:{}/%2f", self.port)
    }

    /// `rabbitmqctl <args>` against this node (its cookie is in the node's HOME).
    fn ctl(&self, args: &[&str]) {
        let out = Command::new(rabbitmqctl_binary())
            .env("HOME", &self.dir)
            .args(["-n", &self.name])
            .args(args)
            .output()
            .expect("rabbitmqctl is installed (scripts/setup.sh)");
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// SIGKILL to the whole node (the start script and the Erlang VM).
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
            // The VM itself, gone from the process table.
            wait_for("the node to die", DEADLINE, || {
                let out = Command::new("pgrep")
                    .args(["-f", &self.name])
                    .output()
                    .ok()?;
                out.stdout.is_empty().then_some(())
            });
        }
    }

    fn restart(&mut self) {
        self.kill();
        self.run();
    }

    fn channel(&self) -> lapin::Channel {
        let url = self.url();
        self.runtime
            .block_on(async move {
                let c = Connection::connect(&url, ConnectionProperties::default()).await?;
                let channel = c.create_channel().await?;
                // Kept open as long as the channel is used.
                std::mem::forget(c);
                Ok::<_, lapin::Error>(channel)
            })
            .expect("channel")
    }

    /// A durable topic exchange `exchange` and a durable queue `queue` bound to it by `key`.
    fn declare(&self, exchange: &str, queue: &str, key: &str) {
        let channel = self.channel();
        let (exchange, queue, key) = (exchange.to_string(), queue.to_string(), key.to_string());
        self.runtime
            .block_on(async move {
                let durable = ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                };
                channel
                    .exchange_declare(
                        exchange.as_str().into(),
                        ExchangeKind::Topic,
                        durable,
                        FieldTable::default(),
                    )
                    .await?;
                let durable = QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                };
                channel
                    .queue_declare(queue.as_str().into(), durable, FieldTable::default())
                    .await?;
                channel
                    .queue_bind(
                        queue.as_str().into(),
                        exchange.as_str().into(),
                        key.as_str().into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await
            })
            .expect("declare");
    }

    /// How many messages `queue` holds, none taken (0 while the node is away).
    fn count(&self, queue: &str) -> u32 {
        let url = self.url();
        let queue = queue.to_string();
        self.runtime.block_on(async move {
            let Ok(c) = Connection::connect(&url, ConnectionProperties::default()).await else {
                return 0;
            };
            let passive = QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            let n = match c.create_channel().await {
                Ok(channel) => channel
                    .queue_declare(queue.as_str().into(), passive, FieldTable::default())
                    .await
                    .map_or(0, |q| q.message_count()),
                Err(_) => 0,
            };
            let _ = c.close(200, "done".into()).await;
            n
        })
    }

    /// Every message `queue` holds now, taken from it.
    fn take(&self, queue: &str) -> Vec<lapin::message::Delivery> {
        let url = self.url();
        let queue = queue.to_string();
        self.runtime.block_on(async move {
            let Ok(c) = Connection::connect(&url, ConnectionProperties::default()).await else {
                return Vec::new();
            };
            let Ok(channel) = c.create_channel().await else {
                return Vec::new();
            };
            let mut taken = Vec::new();
            let options = BasicGetOptions { no_ack: true };
            while let Ok(Some(m)) = channel.basic_get(queue.as_str().into(), options).await {
                taken.push(m.delivery);
            }
            let _ = c.close(200, "done".into()).await;
            taken
        })
    }
}

impl Drop for Rabbit {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn header(m: &lapin::message::Delivery, name: &str) -> Option<String> {
    let headers = m.properties.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        other => Some(format!("{other:?}")),
    }
}

fn message_id(m: &lapin::message::Delivery) -> Option<String> {
    m.properties.message_id().as_ref().map(|s| s.to_string())
}

/// The message as the CloudEvents SDK reads it: structured mode from the body; binary mode
/// built from the `cloudEvents_*` properties (the SDK has no AMQP binding).
fn event_of(m: &lapin::message::Delivery) -> cloudevents::Event {
    let content_type = m.properties.content_type().as_ref().map(|s| s.to_string());
    if content_type.as_deref() == Some("application/cloudevents+json") {
        return serde_json::from_slice(&m.data).expect("a CloudEvents JSON event");
    }
    let mut json = serde_json::Map::new();
    if let Some(headers) = m.properties.headers() {
        for (name, value) in headers.inner() {
            let name = name.as_str();
            if let (Some(attribute), AMQPValue::LongString(v)) =
                (name.strip_prefix("cloudEvents_"), value)
            {
                json.insert(
                    attribute.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned().into(),
                );
            }
        }
    }
    if let Some(t) = content_type {
        json.insert("datacontenttype".into(), t.into());
    }
    let data: serde_json::Value = serde_json::from_slice(&m.data).expect("json data");
    json.insert("data".into(), data);
    serde_json::from_value(serde_json::Value::Object(json)).expect("the SDK reads it")
}

/// A server without credentials in its options; they are in its user mapping (guest's).
fn create_amqp_server(c: &mut PgClient, name: &str, rabbit: &Rabbit, options: &str) {
    c.batch_execute(&format!(
        "CREATE SERVER {name} FOREIGN DATA WRAPPER broadcaster \
           OPTIONS (backend 'amqp', url 'amqp://127.0.0.1:{}/%2f'{options});
         CREATE USER MAPPING FOR PUBLIC SERVER {name} OPTIONS (url '{}')",
        rabbit.port,
        rabbit.url()
    ))
    .expect("create amqp server");
}

fn publish(c: &mut PgClient, backend: &str, stream: Option<&str>, key: Option<&str>) -> String {
    c.query_one(
        "SELECT broadcaster_publish('t', '{\"n\": 1}'::jsonb, partition_key => $1, stream => $2, backend => $3)::text",
        &[&key, &stream, &backend],
    )
    .expect("publish")
    .get(0)
}

#[test]
fn every_attribute_arrives_through_rabbitmq_in_binary_and_structured_mode() {
    let rabbit = Rabbit::start();
    rabbit.declare("events", "orders", "orders.#");
    let s = Setup::new(&[]);
    let mut c = s.cluster.connect();
    create_amqp_server(
        &mut c,
        "abin",
        &rabbit,
        ", exchange 'events', stream 'orders.bin'",
    );
    create_amqp_server(
        &mut c,
        "astr",
        &rabbit,
        ", exchange 'events', stream 'orders.str', message_mode 'structured'",
    );
    let data = common::EVERY_ATTRIBUTE_DATA;
    let mut ids = HashMap::new();
    for backend in ["abin", "astr"] {
        let id = common::insert_every_attribute(&mut c, backend);
        ids.insert(backend, id);
    }
    let mut taken = Vec::new();
    wait_for("both messages", DEADLINE, || {
        taken.extend(rabbit.take("orders"));
        (taken.len() >= 2).then_some(())
    });
    let on = |routing_key: &str| {
        taken
            .iter()
            .find(|m| m.routing_key.as_str() == routing_key)
            .unwrap_or_else(|| panic!("a message routed by {routing_key}"))
    };
    let bin = on("orders.bin");
    assert_eq!(message_id(bin), Some(ids["abin"].clone()));
    assert_eq!(bin.properties.delivery_mode(), &Some(2), "persistent");
    assert_eq!(
        header(bin, "cloudEvents_specversion").as_deref(),
        Some("1.0")
    );
    assert_eq!(
        header(bin, "cloudEvents_subject").as_deref(),
        Some("Zürich 100%")
    );
    assert_eq!(
        bin.properties
            .content_type()
            .as_ref()
            .map(|s| s.to_string())
            .as_deref(),
        Some("application/json")
    );
    assert_eq!(bin.data, data.as_bytes(), "the stored text, unchanged");
    let structured = on("orders.str");
    assert_eq!(message_id(structured), Some(ids["astr"].clone()));
    for (backend, message) in [("abin", bin), ("astr", structured)] {
        let e = event_of(message);
        assert_eq!(e.id(), ids[backend], "{backend}");
        assert_eq!(e.ty(), "order.created");
        assert_eq!(e.source().to_string(), "/shop");
        assert_eq!(e.specversion().as_str(), "1.0");
        assert_eq!(e.datacontenttype(), Some("application/json"), "{backend}");
        assert!(e.time().is_some());
        assert_eq!(e.subject(), Some("Zürich 100%"), "{backend}");
        assert_eq!(
            e.dataschema().map(|u| u.to_string()).as_deref(),
            Some("https://example.com/order.json")
        );
        let extension = |name: &str| e.extension(name).map(|v| v.to_string());
        assert_eq!(extension("tenant").as_deref(), Some("acme"), "{backend}");
        assert_eq!(extension("priority").as_deref(), Some("3"), "{backend}");
        assert_eq!(
            extension("partitionkey").as_deref(),
            Some("o-1"),
            "{backend}"
        );
    }
    // A mapping's password, for a node that is not there: the errors say so without it.
    c.batch_execute(&format!(
        "CREATE SERVER closed FOREIGN DATA WRAPPER broadcaster OPTIONS (backend 'amqp');
         CREATE USER MAPPING FOR PUBLIC SERVER closed
           OPTIONS (url 'amqp://relay:s3cret-pw@127.0.0.1:{}/%2f')",
        common::free_port()
    ))
    .expect("closed server");
    publish(&mut c, "closed", None, None);
    common::wait_outage(&s.cluster, "closed");
    assert!(
        !s.cluster.log().contains("s3cret-pw"),
        "the mapping's password stays out of the log"
    );
}

#[test]
fn an_unroutable_event_goes_dead_while_others_flow() {
    let rabbit = Rabbit::start();
    rabbit.declare("events", "orders", "orders.#");
    let s = Setup::new(&[
        ("broadcaster.max_attempts", "2"),
        ("broadcaster.poll_interval", "200ms"),
        ("broadcaster.retry_max_delay", "1s"),
    ]);
    let mut c = s.cluster.connect();
    create_amqp_server(
        &mut c,
        "a",
        &rabbit,
        ", exchange 'events', stream 'orders.all'",
    );
    let poison = publish(&mut c, "a", Some("nowhere"), Some("p"));
    let mut others = Vec::new();
    for i in 0..20 {
        others.push(publish(&mut c, "a", None, Some(&format!("k{i}"))));
    }
    let mut delivered = Vec::new();
    wait_for("the others", DEADLINE, || {
        delivered.extend(rabbit.take("orders").iter().filter_map(message_id));
        (delivered.len() >= others.len()).then_some(())
    });
    Tally::count(&others, &delivered).assert_exactly_once("amqp, poison beside");
    let (attempts, error) = common::wait_dead(&mut c, &poison);
    assert_eq!(attempts, 2);
    assert!(error.contains("NO_ROUTE"), "{error}");
    // A message over the node's max_message_size among others in one batch: RabbitMQ closes
    // the channel, failing every pending confirm; only the large one is charged.
    let big = format!("{{\"x\": \"{}\"}}", "y".repeat(MAX_MESSAGE * 2));
    c.batch_execute("BEGIN").expect("begin");
    let large: String = c
        .query_one(
            "SELECT broadcaster_publish('t', $1::text, partition_key => 'big', backend => 'a')::text",
            &[&big],
        )
        .expect("publish")
        .get(0);
    let mut beside = Vec::new();
    for i in 0..20 {
        beside.push(publish(&mut c, "a", None, Some(&format!("b{i}"))));
    }
    c.batch_execute("COMMIT").expect("commit");
    let mut taken = Vec::new();
    wait_for("the events beside it", DEADLINE, || {
        taken.extend(rabbit.take("orders").iter().filter_map(message_id));
        (taken.len() >= beside.len()).then_some(())
    });
    Tally::count(&beside, &taken).assert_exactly_once("amqp, too large beside");
    let error: String = wait_for("the large event dead", DEADLINE, || {
        c.query_opt(
            "SELECT last_error FROM broadcaster_dead_events WHERE id::text = $1",
            &[&large],
        )
        .ok()
        .flatten()
        .map(|r| r.get(0))
    });
    assert!(error.contains("refused"), "{error}");
    // An exchange that does not exist is the server's misconfiguration, never an event's.
    create_amqp_server(&mut c, "missing", &rabbit, ", exchange 'nope'");
    let waiting = publish(&mut c, "missing", None, None);
    wait_for("the missing exchange named", DEADLINE, || {
        s.cluster
            .log()
            .contains("the broker has no exchange \"nope\"")
            .then_some(())
    });
    let failures: i64 = c
        .query_one(
            "SELECT count(*) FROM broadcaster_failures f JOIN broadcaster_outbox o USING (seq)
              WHERE o.id::text = $1",
            &[&waiting],
        )
        .expect("failures")
        .get(0);
    assert_eq!(failures, 0, "nothing counted against the event");
}

#[test]
fn the_node_killed_and_restarted_mid_drain_loses_nothing() {
    let mut rabbit = Rabbit::start();
    rabbit.declare("events", "orders", "orders.#");
    let s = Setup::new(&[
        ("broadcaster.poll_interval", "200ms"),
        ("broadcaster.retry_max_delay", "1s"),
        ("broadcaster.network_timeout", "1s"),
    ]);
    let mut c = s.cluster.connect();
    create_amqp_server(
        &mut c,
        "a",
        &rabbit,
        ", exchange 'events', stream 'orders.all'",
    );
    // 2,000 events of 50 keys, 100 per transaction; the node SIGKILLed once some have
    // arrived, 1,000 committed while it is dead, then started again on its data.
    const TOTAL: usize = 2000;
    let mut produced = Vec::with_capacity(TOTAL);
    let mut order: HashMap<String, Vec<String>> = HashMap::new();
    let mut commit = |c: &mut PgClient, chunk: usize| {
        c.batch_execute("BEGIN").expect("begin");
        for i in 0..100 {
            let key = format!("k{}", (chunk * 100 + i) % 50);
            let id = publish(c, "a", None, Some(&key));
            order.entry(key).or_default().push(id.clone());
            produced.push(id);
        }
        c.batch_execute("COMMIT").expect("commit");
    };
    // Nothing is taken from the queue before the end: a node killed forgets the removal of
    // messages taken shortly before (it journals them lazily) and hands them out again, which
    // would count as the relay's duplicates.
    let mut delivered: Vec<String> = Vec::new();
    for chunk in 0..6 {
        commit(&mut c, chunk);
    }
    wait_for("some delivered", DEADLINE, || {
        (rabbit.count("orders") >= 100).then_some(())
    });
    rabbit.kill();
    for chunk in 6..16 {
        commit(&mut c, chunk);
    }
    let pending_at_restart = common::pending(&mut c);
    rabbit.restart();
    for chunk in 16..20 {
        commit(&mut c, chunk);
    }
    assert!(
        pending_at_restart >= 1000,
        "{pending_at_restart} events waited for the node"
    );
    wait_for("every event taken", DEADLINE, || {
        delivered.extend(rabbit.take("orders").iter().filter_map(message_id));
        let unique: HashSet<&String> = delivered.iter().collect();
        (unique.len() >= TOTAL).then_some(())
    });
    let tally = Tally::count(&produced, &delivered);
    // A message confirmed is on disk; one sent but unconfirmed when the node died may be there
    // too and be sent again: a duplicate, with its id.
    tally.assert_none_lost("amqp, node killed mid-drain");
    assert!(
        s.cluster.log().contains("broker unavailable"),
        "the relay met the dead node"
    );
    common::assert_commit_order(&delivered, &order);
}

#[test]
fn tls_with_a_client_certificate_and_a_password_from_a_user_mapping() {
    let dir = std::env::temp_dir().join(format!("bc-amqp-tls-{}", std::process::id()));
    common::make_certificates(&dir);
    let path = |f: &str| dir.join(f).to_string_lossy().into_owned();
    let rabbit = Rabbit::start_secure(&dir);
    let tls_port = rabbit.tls_port.expect("a TLS listener");
    rabbit.declare("secure", "secure-q", "#");
    let s = Setup::new(&[
        ("broadcaster.max_attempts", "2"),
        ("broadcaster.poll_interval", "200ms"),
        ("broadcaster.retry_max_delay", "1s"),
    ]);
    let mut c = s.cluster.connect();
    for (name, password) in [("a", PASSWORD), ("wrong", "nope-amqp-pw")] {
        c.batch_execute(&format!(
            "CREATE SERVER {name} FOREIGN DATA WRAPPER broadcaster
               OPTIONS (backend 'amqp', url 'amqps://127.0.0.1:{tls_port}/%2f',
                        exchange 'secure', stream 'tls.{name}', tls_ca_file '{}',
                        tls_cert_file '{}', tls_key_file '{}');
             CREATE USER MAPPING FOR PUBLIC SERVER {name}
               OPTIONS (url 'amqps://relay:{password}@127.0.0.1:{tls_port}/%2f')",
            path("ca.pem"),
            path("client.pem"),
            path("client.key"),
        ))
        .expect("server");
    }
    let id = publish(&mut c, "a", None, None);
    wait_for("the event in the queue", DEADLINE, || {
        (rabbit.count("secure-q") == 1).then_some(())
    });
    let taken = rabbit.take("secure-q");
    assert_eq!(message_id(&taken[0]), Some(id));
    // A wrong password: the node refuses the login; an outage, nothing counted, and neither
    // password in the log.
    let refused = publish(&mut c, "wrong", None, None);
    common::wait_outage(&s.cluster, "wrong");
    let failures = common::failures(&mut c);
    assert_eq!(failures, 0, "a refused login is no event's fault");
    assert_eq!(
        common::pending(&mut c),
        1,
        "{refused} waits for the login to work"
    );
    assert_eq!(rabbit.count("secure-q"), 0, "nothing went out as \"wrong\"");
    // Fixed in the user mapping: it goes out.
    c.batch_execute(&format!(
        "ALTER USER MAPPING FOR PUBLIC SERVER wrong
           OPTIONS (SET url 'amqps://relay:{PASSWORD}@127.0.0.1:{tls_port}/%2f')"
    ))
    .expect("fix the password");
    wait_for("the fixed server's event", DEADLINE, || {
        (rabbit.count("secure-q") == 1).then_some(())
    });
    let taken = rabbit.take("secure-q");
    assert_eq!(message_id(&taken[0]), Some(refused));
    // RabbitMQ's topic permissions: the user may publish to the exchange with routing keys
    // tls.* only. A forbidden key closes the channel (403) and fails the confirms pending
    // beside it; only the event at fault is charged, and the others arrive.
    rabbit.ctl(&[
        "set_topic_permissions",
        "-p",
        "/",
        "relay",
        "secure",
        "^tls\\.",
        ".*",
    ]);
    c.batch_execute("BEGIN").expect("begin");
    let forbidden = publish(&mut c, "a", Some("forbidden.key"), Some("f"));
    let mut beside = Vec::new();
    for i in 0..10 {
        beside.push(publish(&mut c, "a", None, Some(&format!("b{i}"))));
    }
    c.batch_execute("COMMIT").expect("commit");
    let mut delivered = Vec::new();
    wait_for("the events beside the forbidden one", DEADLINE, || {
        delivered.extend(rabbit.take("secure-q").iter().filter_map(message_id));
        (delivered.len() >= beside.len()).then_some(())
    });
    Tally::count(&beside, &delivered).assert_exactly_once("amqp, forbidden key beside");
    let (attempts, error) = common::wait_dead(&mut c, &forbidden);
    assert_eq!(attempts, 2);
    assert!(error.contains("access to topic"), "{error}");
    let log = s.cluster.log();
    assert!(
        !log.contains(PASSWORD) && !log.contains("nope-amqp-pw"),
        "passwords stay out of the log"
    );
    drop(rabbit);
    let _ = std::fs::remove_dir_all(&dir);
}
