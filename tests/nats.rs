//! The `nats` backend end to end, against a real `nats-server` with JetStream that this test
//! starts on a free loopback port with its own store: every CloudEvents attribute in binary and
//! structured mode, read back from the stream with the async-nats client and parsed with the
//! CloudEvents SDK; an event to a subject no stream listens on dead while others flow; the server
//! SIGKILLed and restarted mid-drain with nothing lost and, thanks to `Nats-Msg-Id`, nothing
//! twice.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_nats::jetstream;
use cloudevents::AttributesReader;
use common::{wait_for, PgClient, Setup, Tally, DEADLINE};

/// The password of user `relay` on a secure server.
const PASSWORD: &str = "s3cret-pw";

/// The nats-server binary: `BROADCASTER_NATS_SERVER`, or Debian's.
fn nats_server_binary() -> String {
    std::env::var("BROADCASTER_NATS_SERVER").unwrap_or_else(|_| "/usr/sbin/nats-server".into())
}

/// A nats-server with JetStream on a free loopback port, its store in a folder of its own.
struct NatsServer {
    port: u16,
    store: PathBuf,
    /// Set: TLS with a client certificate required (the certificates of
    /// [`common::make_certificates`] in this folder), and user `relay` with [`PASSWORD`].
    secure: Option<PathBuf>,
    child: Option<Child>,
    runtime: tokio::runtime::Runtime,
}

impl NatsServer {
    fn start() -> NatsServer {
        Self::start_with(None)
    }

    fn start_with(secure: Option<PathBuf>) -> NatsServer {
        let port = common::free_port();
        let store = std::env::temp_dir().join(format!("bc-nats-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&store);
        let mut server = NatsServer {
            port,
            store,
            secure,
            child: None,
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime"),
        };
        server.run();
        server
    }

    fn run(&mut self) {
        let child = Command::new(nats_server_binary())
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.store)
            .args(self.secure.iter().flat_map(|d| {
                let file = |f: &str| d.join(f).to_string_lossy().into_owned();
                [
                    "--tls".to_string(),
                    "--tlscert".into(),
                    file("server.pem"),
                    "--tlskey".into(),
                    file("server.key"),
                    "--tlscacert".into(),
                    file("ca.pem"),
                    "--tlsverify".into(),
                    "--user".into(),
                    "relay".into(),
                    "--pass".into(),
                    PASSWORD.into(),
                ]
            }))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server is installed (scripts/setup.sh)");
        self.child = Some(child);
        wait_for("nats-server to listen", DEADLINE, || {
            std::net::TcpStream::connect(("127.0.0.1", self.port))
                .ok()
                .map(drop)
        });
    }

    fn url(&self) -> String {
        let scheme = if self.secure.is_some() { "tls" } else { "nats" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// How the test's own client connects: with the relay's certificate and password when
    /// the server is secure.
    fn options(&self) -> async_nats::ConnectOptions {
        let options = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(2))
            .max_reconnects(Some(1));
        match &self.secure {
            None => options,
            Some(d) => options
                .add_root_certificates(d.join("ca.pem"))
                .add_client_certificate(d.join("client.pem"), d.join("client.key"))
                .require_tls(true)
                .user_and_password("relay".into(), PASSWORD.into()),
        }
    }

    /// SIGKILL: no goodbye to its clients.
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

    /// Sends `signal` (`STOP`, `CONT`) to the server.
    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal}");
    }

    fn jetstream(&self) -> jetstream::Context {
        let (url, options) = (self.url(), self.options());
        self.runtime.block_on(async move {
            let client = options.connect(url).await.expect("connect");
            jetstream::new(client)
        })
    }

    /// A stream named `name` taking `subjects`, duplicates dropped within two minutes.
    fn create_stream(&self, name: &str, subjects: &[&str]) {
        let js = self.jetstream();
        let config = jetstream::stream::Config {
            name: name.into(),
            subjects: subjects.iter().map(|s| s.to_string()).collect(),
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        };
        self.runtime
            .block_on(async move { js.create_stream(config).await.map(drop) })
            .expect("create stream");
    }

    /// Every message `stream` holds, in order; empty while the server is away.
    fn messages(&self, stream: &str) -> Vec<jetstream::message::StreamMessage> {
        let js = self.jetstream_or_none();
        let Some(js) = js else { return Vec::new() };
        let stream = stream.to_string();
        self.runtime.block_on(async move {
            let Ok(mut stream) = js.get_stream(stream).await else {
                return Vec::new();
            };
            let Ok(info) = stream.info().await else {
                return Vec::new();
            };
            let (first, last) = (info.state.first_sequence, info.state.last_sequence);
            let mut messages = Vec::new();
            for seq in first.max(1)..=last {
                if let Ok(m) = stream.get_raw_message(seq).await {
                    messages.push(m);
                }
            }
            messages
        })
    }

    /// How many messages `stream` holds.
    fn count(&self, stream: &str) -> u64 {
        let Some(js) = self.jetstream_or_none() else {
            return 0;
        };
        let stream = stream.to_string();
        self.runtime.block_on(async move {
            let Ok(mut stream) = js.get_stream(stream).await else {
                return 0;
            };
            stream.info().await.map_or(0, |i| i.state.messages)
        })
    }

    fn jetstream_or_none(&self) -> Option<jetstream::Context> {
        let (url, options) = (self.url(), self.options());
        self.runtime.block_on(async move {
            let client = options.connect(url).await.ok()?;
            Some(jetstream::new(client))
        })
    }

    fn wait_messages(&self, stream: &str, n: usize) -> Vec<jetstream::message::StreamMessage> {
        wait_for(&format!("{n} messages in {stream}"), DEADLINE, || {
            let messages = self.messages(stream);
            (messages.len() >= n).then_some(messages)
        })
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

/// A message's headers as HTTP's, which the NATS binding's binary mode mirrors.
fn http_headers(message: &jetstream::message::StreamMessage) -> http::HeaderMap {
    let mut map = http::HeaderMap::new();
    for (name, values) in message.headers.iter() {
        for value in values {
            if let (Ok(n), Ok(v)) = (
                http::HeaderName::from_bytes(
                    AsRef::<str>::as_ref(name).to_ascii_lowercase().as_bytes(),
                ),
                http::HeaderValue::from_str(value.as_str()),
            ) {
                map.append(n, v);
            }
        }
    }
    map
}

/// The message as a CloudEvent, parsed by the SDK's HTTP binding (binary or structured mode).
fn event_of(message: &jetstream::message::StreamMessage) -> cloudevents::Event {
    cloudevents::binding::http::to_event(&http_headers(message), message.payload.to_vec())
        .expect("the SDK reads the message as a CloudEvent")
}

fn header(message: &jetstream::message::StreamMessage, name: &str) -> Option<String> {
    message.headers.get(name).map(|v| v.as_str().to_string())
}

fn create_nats_server(c: &mut PgClient, name: &str, url: &str, options: &str) {
    c.batch_execute(&format!(
        "CREATE SERVER {name} FOREIGN DATA WRAPPER broadcaster \
           OPTIONS (backend 'nats', url '{url}'{options})"
    ))
    .expect("create nats server");
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
fn every_attribute_arrives_through_jetstream_in_binary_and_structured_mode() {
    let nats = NatsServer::start();
    nats.create_stream("ORDERS", &["orders.>"]);
    let s = Setup::new(&[]);
    let mut c = s.cluster.connect();
    create_nats_server(&mut c, "nbin", &nats.url(), ", stream 'orders.bin'");
    create_nats_server(
        &mut c,
        "nstr",
        &nats.url(),
        ", stream 'orders.str', message_mode 'structured'",
    );
    let data = common::EVERY_ATTRIBUTE_DATA;
    let mut ids = HashMap::new();
    for backend in ["nbin", "nstr"] {
        let id = common::insert_every_attribute(&mut c, backend);
        ids.insert(backend, id);
    }
    let messages = nats.wait_messages("ORDERS", 2);
    let on = |subject: &str| {
        messages
            .iter()
            .find(|m| m.subject.as_str() == subject)
            .unwrap_or_else(|| panic!("a message on {subject}"))
    };
    let bin = on("orders.bin");
    assert_eq!(header(bin, "Nats-Msg-Id"), Some(ids["nbin"].clone()));
    assert_eq!(
        header(bin, "content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(
        header(bin, "ce-subject").as_deref(),
        Some("Z%C3%BCrich%20100%25")
    );
    assert_eq!(
        &bin.payload[..],
        data.as_bytes(),
        "the stored text, unchanged"
    );
    let structured = on("orders.str");
    assert_eq!(header(structured, "Nats-Msg-Id"), Some(ids["nstr"].clone()));
    assert_eq!(
        header(structured, "content-type").as_deref(),
        Some("application/cloudevents+json")
    );
    for (backend, message) in [("nbin", bin), ("nstr", structured)] {
        let e = event_of(message);
        assert_eq!(e.id(), ids[backend], "{backend}");
        assert_eq!(e.ty(), "order.created");
        assert_eq!(e.source().to_string(), "/shop");
        assert_eq!(e.specversion().as_str(), "1.0");
        assert_eq!(e.datacontenttype(), Some("application/json"), "{backend}");
        assert!(e.time().is_some());
        let subject = e.subject().map(|s| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        });
        assert_eq!(subject.as_deref(), Some("Zürich 100%"), "{backend}");
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
        let value: serde_json::Value = match e.data() {
            Some(cloudevents::Data::Json(v)) => v.clone(),
            Some(cloudevents::Data::Binary(b)) => serde_json::from_slice(b).expect("json"),
            Some(cloudevents::Data::String(s)) => serde_json::from_str(s).expect("json"),
            None => panic!("{backend}: no data"),
        };
        assert_eq!(value["b"], 1, "{backend}");
    }
}

#[test]
fn an_event_to_a_subject_no_stream_listens_on_goes_dead_while_others_flow() {
    let nats = NatsServer::start();
    nats.create_stream("ORDERS", &["orders.>"]);
    let s = Setup::new(&[
        ("broadcaster.max_attempts", "2"),
        ("broadcaster.poll_interval", "200ms"),
        ("broadcaster.retry_max_delay", "1s"),
    ]);
    let mut c = s.cluster.connect();
    // A subject that is no subject is refused when the server is created.
    let refused = c.batch_execute(&format!(
        "CREATE SERVER bad FOREIGN DATA WRAPPER broadcaster \
           OPTIONS (backend 'nats', url '{}', stream 'orders.*')",
        nats.url()
    ));
    assert_eq!(
        refused
            .err()
            .and_then(|e| e.code().map(|s| s.code().to_string())),
        Some("22023".to_string())
    );
    create_nats_server(&mut c, "n", &nats.url(), ", stream 'orders.all'");
    let poison = publish(&mut c, "n", Some("nowhere.x"), Some("p"));
    let mut others = Vec::new();
    for i in 0..20 {
        others.push(publish(&mut c, "n", None, Some(&format!("k{i}"))));
    }
    let delivered: Vec<String> = nats
        .wait_messages("ORDERS", others.len())
        .iter()
        .filter_map(|m| header(m, "Nats-Msg-Id"))
        .collect();
    Tally::count(&others, &delivered).assert_exactly_once("nats, poison beside");
    let (attempts, error) = common::wait_dead(&mut c, &poison);
    assert_eq!(attempts, 2);
    assert!(error.contains("no JetStream stream"), "{error}");
    // An event naming the server's own API as its subject never reaches it: the stream it
    // names stays, with what it holds.
    let attack = publish(
        &mut c,
        "n",
        Some("$JS.API.STREAM.DELETE.ORDERS"),
        Some("attack"),
    );
    let error: String = wait_for("the API subject refused", DEADLINE, || {
        c.query_opt(
            "SELECT last_error FROM broadcaster_dead_events WHERE id::text = $1",
            &[&attack],
        )
        .ok()
        .flatten()
        .map(|r| r.get(0))
    });
    assert!(error.contains("server's own API"), "{error}");
    assert_eq!(
        nats.count("ORDERS"),
        others.len() as u64,
        "the stream is still there"
    );
}

#[test]
fn the_server_killed_and_restarted_mid_drain_loses_nothing_and_stores_nothing_twice() {
    let mut nats = NatsServer::start();
    nats.create_stream("ORDERS", &["orders.>"]);
    let s = Setup::new(&[
        ("broadcaster.poll_interval", "200ms"),
        ("broadcaster.retry_max_delay", "1s"),
        ("broadcaster.network_timeout", "1s"),
    ]);
    let mut c = s.cluster.connect();
    create_nats_server(&mut c, "n", &nats.url(), ", stream 'orders.all'");
    // 2,000 events of 50 keys, 100 per transaction: the server frozen (SIGSTOP) for longer
    // than the relay's timeout once some have arrived, so that publishes it then takes are sent
    // again; then SIGKILLed, events committed while it is dead, and restarted on its store.
    const TOTAL: usize = 2000;
    let mut produced = Vec::with_capacity(TOTAL);
    let mut order: HashMap<String, Vec<String>> = HashMap::new();
    let mut commit = |c: &mut PgClient, chunk: usize| {
        c.batch_execute("BEGIN").expect("begin");
        for i in 0..100 {
            let key = format!("k{}", (chunk * 100 + i) % 50);
            let id = publish(c, "n", None, Some(&key));
            order.entry(key).or_default().push(id.clone());
            produced.push(id);
        }
        c.batch_execute("COMMIT").expect("commit");
    };
    for chunk in 0..4 {
        commit(&mut c, chunk);
    }
    nats.wait_messages("ORDERS", 100);
    nats.signal("STOP");
    for chunk in 4..6 {
        commit(&mut c, chunk);
    }
    std::thread::sleep(Duration::from_secs(2));
    nats.signal("CONT");
    nats.wait_messages("ORDERS", 300);
    nats.kill();
    for chunk in 6..16 {
        commit(&mut c, chunk);
    }
    let pending_at_restart = common::pending(&mut c);
    nats.restart();
    for chunk in 16..20 {
        commit(&mut c, chunk);
    }
    assert!(
        pending_at_restart >= 1000,
        "{pending_at_restart} events waited for the server"
    );
    let delivered: Vec<String> = wait_for("every event in the stream", DEADLINE, || {
        let ids: Vec<String> = nats
            .messages("ORDERS")
            .iter()
            .filter_map(|m| header(m, "Nats-Msg-Id"))
            .collect();
        let unique: HashSet<&String> = ids.iter().collect();
        (unique.len() >= TOTAL).then_some(ids)
    });
    common::wait_drained(&mut c);
    let tally = Tally::count(&produced, &delivered);
    tally.assert_exactly_once("nats, server killed mid-drain");
    let log = s.cluster.log();
    assert!(
        log.contains("ack in time") || log.contains("no acknowledgement in time"),
        "the frozen server left publishes unacknowledged, sent again"
    );
    assert!(
        log.contains("broker unavailable"),
        "the relay met the dead server"
    );
    common::assert_commit_order(&delivered, &order);
}

#[test]
fn a_batch_larger_than_the_clients_ack_window_goes_out_whole() {
    // The JetStream context lets 5,000 publishes await their acks at once; a batch of 6,000
    // is sent in windows.
    let nats = NatsServer::start();
    nats.create_stream("ORDERS", &["orders.>"]);
    let s = Setup::new(&[("broadcaster.batch_size", "6000")]);
    let mut c = s.cluster.connect();
    create_nats_server(&mut c, "n", &nats.url(), ", stream 'orders.all'");
    c.batch_execute(
        "INSERT INTO broadcaster_outbox (type, data, backend)
         SELECT 't', '{}', 'n' FROM generate_series(1, 6000)",
    )
    .expect("insert");
    common::wait_drained(&mut c);
    assert_eq!(nats.count("ORDERS"), 6000);
    assert!(
        !s.cluster.log().contains("broker unavailable"),
        "no window overflowed into an outage"
    );
}

#[test]
fn tls_with_a_client_certificate_and_a_password_from_a_user_mapping() {
    let dir = std::env::temp_dir().join(format!("bc-nats-tls-{}", std::process::id()));
    common::make_certificates(&dir);
    let path = |f: &str| dir.join(f).to_string_lossy().into_owned();
    let nats = NatsServer::start_with(Some(dir.clone()));
    nats.create_stream("ORDERS", &["orders.>"]);
    let s = Setup::new(&[
        ("broadcaster.poll_interval", "200ms"),
        ("broadcaster.retry_max_delay", "1s"),
    ]);
    let mut c = s.cluster.connect();
    let url = nats.url();
    let with_password =
        |password: &str| url.replacen("tls://", &format!("tls://relay:{password}@"), 1);
    for (name, password) in [("n", PASSWORD), ("wrong", "nope-pw")] {
        c.batch_execute(&format!(
            "CREATE SERVER {name} FOREIGN DATA WRAPPER broadcaster
               OPTIONS (backend 'nats', url '{url}', stream 'orders.tls', tls_ca_file '{}',
                        tls_cert_file '{}', tls_key_file '{}');
             CREATE USER MAPPING FOR PUBLIC SERVER {name} OPTIONS (url '{}')",
            path("ca.pem"),
            path("client.pem"),
            path("client.key"),
            with_password(password),
        ))
        .expect("server");
    }
    let id = publish(&mut c, "n", None, None);
    let messages = nats.wait_messages("ORDERS", 1);
    assert_eq!(header(&messages[0], "Nats-Msg-Id"), Some(id));
    // A wrong password: an outage, nothing counted, and neither password in the log.
    let refused = publish(&mut c, "wrong", None, None);
    common::wait_outage(&s.cluster, "wrong");
    let failures = common::failures(&mut c);
    assert_eq!(failures, 0, "a refused login is no event's fault");
    assert_eq!(nats.count("ORDERS"), 1, "{refused} not stored");
    let log = s.cluster.log();
    assert!(
        !log.contains(PASSWORD) && !log.contains("nope-pw"),
        "passwords stay out of the log"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
