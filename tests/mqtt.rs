//! The `mqtt` backend end to end, against a real `mosquitto` (MQTT 5) that this test starts on
//! a free loopback port with its own persistence folder: every CloudEvents attribute in binary
//! and structured mode, received by a rumqttc subscriber; an event over the broker's maximum
//! packet size dead while others flow; the broker restarted mid-drain with nothing lost; TLS
//! with a client certificate and a password from a user mapping.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use cloudevents::AttributesReader;
use common::{wait_for, PgClient, Setup, Tally, DEADLINE};
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};

/// The mosquitto binary: `BROADCASTER_MOSQUITTO`, or Debian's.
fn mosquitto_binary() -> String {
    std::env::var("BROADCASTER_MOSQUITTO").unwrap_or_else(|_| "/usr/sbin/mosquitto".into())
}

/// Its largest packet, told to clients in CONNACK.
const MAX_PACKET: usize = 8192;

/// A mosquitto on a free loopback port, persisting to a folder of its own.
struct Broker {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

/// The relay's password on the TLS listener of [`Broker::start_secure`].
const PASSWORD: &str = "s3cret-mqtt-pw";

impl Broker {
    fn start() -> Broker {
        Self::start_with(None)
    }

    /// With a second listener, on `tls_port`: TLS with `certificates` (those of
    /// [`common::make_certificates`]), a client certificate required, and user `relay` with
    /// [`PASSWORD`]. The first listener stays anonymous and plain, for the test's subscriber.
    fn start_secure(certificates: &std::path::Path) -> (Broker, u16) {
        let tls_port = common::free_port();
        (Self::start_with(Some((certificates, tls_port))), tls_port)
    }

    fn start_with(secure: Option<(&std::path::Path, u16)>) -> Broker {
        let port = common::free_port();
        let dir = std::env::temp_dir().join(format!("bc-mqtt-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("broker dir");
        // Started as root, mosquitto runs as its own user: it must be able to save its state.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let mut conf = format!(
            "per_listener_settings true\nmax_packet_size {MAX_PACKET}\n\
             persistence true\npersistence_location {}/\nmax_queued_messages 0\n\
             listener {port} 127.0.0.1\nallow_anonymous true\n",
            dir.display()
        );
        if let Some((certificates, tls_port)) = secure {
            let passwords = dir.join("passwords");
            let made = Command::new("mosquitto_passwd")
                .args(["-b", "-c"])
                .arg(&passwords)
                .args(["relay", PASSWORD])
                .output()
                .expect("mosquitto_passwd is installed (scripts/setup.sh)");
            assert!(made.status.success(), "mosquitto_passwd: {made:?}");
            std::fs::set_permissions(&passwords, std::fs::Permissions::from_mode(0o644))
                .expect("chmod");
            let file = |f: &str| certificates.join(f).display().to_string();
            conf.push_str(&format!(
                "listener {tls_port} 127.0.0.1\nallow_anonymous false\npassword_file {}\n\
                 cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
                passwords.display(),
                file("ca.pem"),
                file("server.pem"),
                file("server.key"),
            ));
        }
        std::fs::write(dir.join("mosquitto.conf"), conf).expect("mosquitto.conf");
        let mut broker = Broker {
            port,
            dir,
            child: None,
        };
        broker.run();
        if let Some((_, tls_port)) = secure {
            wait_for("mosquitto's TLS listener", DEADLINE, || {
                std::net::TcpStream::connect(("127.0.0.1", tls_port))
                    .ok()
                    .map(drop)
            });
        }
        broker
    }

    fn run(&mut self) {
        let child = Command::new(mosquitto_binary())
            .arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto is installed (scripts/setup.sh)");
        self.child = Some(child);
        wait_for("mosquitto to listen", DEADLINE, || {
            std::net::TcpStream::connect(("127.0.0.1", self.port))
                .ok()
                .map(drop)
        });
    }

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// SIGTERM, and waits: mosquitto saves its sessions and queued messages on the way out.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let _ = child.wait();
        }
    }

    fn restart(&mut self) {
        self.stop();
        self.run();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One message as the subscriber received it.
#[derive(Clone, Debug)]
struct Received {
    topic: String,
    payload: Vec<u8>,
    content_type: Option<String>,
    user_properties: Vec<(String, String)>,
}

impl Received {
    fn property(&self, name: &str) -> Option<&str> {
        self.user_properties
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The event it carries, as the CloudEvents SDK reads it: structured mode from the
    /// payload; binary mode built from the user properties (the SDK has no MQTT binding).
    fn event(&self) -> cloudevents::Event {
        if self.content_type.as_deref() == Some("application/cloudevents+json") {
            return serde_json::from_slice(&self.payload).expect("a CloudEvents JSON event");
        }
        let mut json = serde_json::Map::new();
        for (name, value) in &self.user_properties {
            json.insert(name.clone(), serde_json::Value::String(value.clone()));
        }
        if let Some(t) = &self.content_type {
            json.insert("datacontenttype".into(), t.clone().into());
        }
        let data: serde_json::Value = serde_json::from_slice(&self.payload).expect("json data");
        json.insert("data".into(), data);
        serde_json::from_value(serde_json::Value::Object(json)).expect("the SDK reads it")
    }
}

/// A QoS 1 subscriber to `topics` with a persistent session, recording every message.
struct Subscriber {
    received: Arc<Mutex<Vec<Received>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Subscriber {
    fn start(broker: &Broker, filter: &str) -> Subscriber {
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let stop: Arc<AtomicBool> = Arc::default();
        let (port, filter) = (broker.port, filter.to_string());
        let (r, s) = (Arc::clone(&received), Arc::clone(&stop));
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let mut options = MqttOptions::new("test-subscriber", "127.0.0.1", port);
                options
                    .set_clean_start(false)
                    .set_session_expiry_interval(Some(3600))
                    .set_max_packet_size(Some(1 << 20));
                let (client, mut events) = AsyncClient::new(options, 100);
                client
                    .subscribe(filter, QoS::AtLeastOnce)
                    .await
                    .expect("subscribe");
                while !s.load(Ordering::SeqCst) {
                    match tokio::time::timeout(Duration::from_millis(100), events.poll()).await {
                        Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                            let _ = ready_tx.send(());
                        }
                        Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                            let properties = p.properties.unwrap_or_default();
                            r.lock().expect("received").push(Received {
                                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                                payload: p.payload.to_vec(),
                                content_type: properties.content_type,
                                user_properties: properties.user_properties,
                            });
                        }
                        Ok(Ok(_)) | Err(_) => {}
                        Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            });
        });
        ready
            .recv_timeout(DEADLINE)
            .expect("the subscription acknowledged");
        Subscriber {
            received,
            stop,
            thread: Some(thread),
        }
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().expect("received").clone()
    }

    fn ids(&self) -> Vec<String> {
        self.received()
            .iter()
            .filter_map(|r| r.property("id").map(str::to_string))
            .collect()
    }

    fn wait(&self, n: usize) -> Vec<Received> {
        wait_for(&format!("{n} messages received"), DEADLINE, || {
            let received = self.received();
            (received.len() >= n).then_some(received)
        })
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn create_mqtt_server(c: &mut PgClient, name: &str, url: &str, options: &str) {
    c.batch_execute(&format!(
        "CREATE SERVER {name} FOREIGN DATA WRAPPER broadcaster \
           OPTIONS (backend 'mqtt', url '{url}'{options})"
    ))
    .expect("create mqtt server");
}

fn publish(c: &mut PgClient, backend: &str, data: &str, key: Option<&str>) -> String {
    c.query_one(
        "SELECT broadcaster_publish('t', $1::text, partition_key => $2, backend => $3)::text",
        &[&data, &key, &backend],
    )
    .expect("publish")
    .get(0)
}

#[test]
fn every_attribute_arrives_over_mqtt_5_in_binary_and_structured_mode() {
    let broker = Broker::start();
    let subscriber = Subscriber::start(&broker, "devices/#");
    let s = Setup::new(&[]);
    let mut c = s.cluster.connect();
    create_mqtt_server(&mut c, "mbin", &broker.url(), ", stream 'devices/bin'");
    create_mqtt_server(
        &mut c,
        "mstr",
        &broker.url(),
        ", stream 'devices/str', message_mode 'structured', client_id 'relay-structured'",
    );
    let data = common::EVERY_ATTRIBUTE_DATA;
    let mut ids = HashMap::new();
    for backend in ["mbin", "mstr"] {
        let id = common::insert_every_attribute(&mut c, backend);
        ids.insert(backend, id);
    }
    let received = subscriber.wait(2);
    let on = |topic: &str| {
        received
            .iter()
            .find(|r| r.topic == topic)
            .unwrap_or_else(|| panic!("a message on {topic}: {received:?}"))
    };
    let bin = on("devices/bin");
    assert_eq!(bin.property("id"), Some(ids["mbin"].as_str()));
    assert_eq!(bin.property("specversion"), Some("1.0"));
    assert_eq!(
        bin.property("subject"),
        Some("Zürich 100%"),
        "UTF-8, as it is"
    );
    assert_eq!(bin.content_type.as_deref(), Some("application/json"));
    assert_eq!(bin.payload, data.as_bytes(), "the stored text, unchanged");
    let structured = on("devices/str");
    assert_eq!(
        structured.content_type.as_deref(),
        Some("application/cloudevents+json")
    );
    for (backend, message) in [("mbin", bin), ("mstr", structured)] {
        let e = message.event();
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
}

#[test]
fn an_event_over_the_brokers_packet_size_goes_dead_while_others_flow() {
    let broker = Broker::start();
    let subscriber = Subscriber::start(&broker, "devices/#");
    let s = Setup::new(&[
        ("broadcaster.max_attempts", "2"),
        ("broadcaster.poll_interval", "200ms"),
        ("broadcaster.retry_max_delay", "1s"),
    ]);
    let mut c = s.cluster.connect();
    create_mqtt_server(&mut c, "m", &broker.url(), ", stream 'devices/all'");
    let big = format!("{{\"x\": \"{}\"}}", "y".repeat(MAX_PACKET * 2));
    let poison = publish(&mut c, "m", &big, Some("p"));
    let mut others = Vec::new();
    for i in 0..20 {
        others.push(publish(&mut c, "m", "{}", Some(&format!("k{i}"))));
    }
    subscriber.wait(others.len());
    Tally::count(&others, &subscriber.ids()).assert_exactly_once("mqtt, poison beside");
    let (attempts, error) = common::wait_dead(&mut c, &poison);
    assert_eq!(attempts, 2);
    assert!(error.contains(&format!("at most {MAX_PACKET}")), "{error}");
}

#[test]
fn the_broker_restarted_mid_drain_loses_nothing() {
    let mut broker = Broker::start();
    let subscriber = Subscriber::start(&broker, "devices/#");
    let s = Setup::new(&[
        ("broadcaster.poll_interval", "200ms"),
        ("broadcaster.retry_max_delay", "1s"),
        ("broadcaster.network_timeout", "1s"),
    ]);
    let mut c = s.cluster.connect();
    create_mqtt_server(&mut c, "m", &broker.url(), ", stream 'devices/all'");
    // 2,000 events of 50 keys, 100 per transaction; the broker stopped once some have arrived,
    // 1,000 committed while it is away, then started again on its saved state.
    const TOTAL: usize = 2000;
    let mut produced = Vec::with_capacity(TOTAL);
    let mut order: HashMap<String, Vec<String>> = HashMap::new();
    let mut commit = |c: &mut PgClient, chunk: usize| {
        c.batch_execute("BEGIN").expect("begin");
        for i in 0..100 {
            let key = format!("k{}", (chunk * 100 + i) % 50);
            let id = publish(c, "m", "{}", Some(&key));
            order.entry(key).or_default().push(id.clone());
            produced.push(id);
        }
        c.batch_execute("COMMIT").expect("commit");
    };
    for chunk in 0..6 {
        commit(&mut c, chunk);
    }
    subscriber.wait(100);
    broker.stop();
    for chunk in 6..16 {
        commit(&mut c, chunk);
    }
    let pending_at_restart = common::pending(&mut c);
    broker.restart();
    for chunk in 16..20 {
        commit(&mut c, chunk);
    }
    assert!(
        pending_at_restart >= 1000,
        "{pending_at_restart} events waited for the broker"
    );
    let delivered = wait_for("every event received", DEADLINE, || {
        let ids = subscriber.ids();
        let unique: HashSet<&String> = ids.iter().collect();
        (unique.len() >= TOTAL).then_some(ids)
    });
    common::wait_drained(&mut c);
    let tally = Tally::count(&produced, &delivered);
    // MQTT has no de-duplication: a message whose PUBACK was lost may arrive twice, with its id.
    tally.assert_none_lost("mqtt, broker restarted mid-drain");
    assert!(
        s.cluster.log().contains("broker unavailable"),
        "the relay met the stopped broker"
    );
    common::assert_commit_order(&delivered, &order);
}

#[test]
fn tls_with_a_client_certificate_and_a_password_from_a_user_mapping() {
    let dir = std::env::temp_dir().join(format!("bc-mqtt-tls-{}", std::process::id()));
    common::make_certificates(&dir);
    let path = |f: &str| dir.join(f).to_string_lossy().into_owned();
    let (broker, tls_port) = Broker::start_secure(&dir);
    let subscriber = Subscriber::start(&broker, "secure/#");
    let s = Setup::new(&[
        ("broadcaster.poll_interval", "200ms"),
        ("broadcaster.retry_max_delay", "1s"),
    ]);
    let mut c = s.cluster.connect();
    for (name, password) in [("m", PASSWORD), ("wrong", "nope-mqtt-pw")] {
        c.batch_execute(&format!(
            "CREATE SERVER {name} FOREIGN DATA WRAPPER broadcaster
               OPTIONS (backend 'mqtt', url 'mqtts://127.0.0.1:{tls_port}',
                        stream 'secure/{name}', tls_ca_file '{}', tls_cert_file '{}',
                        tls_key_file '{}', client_id 'relay-{name}');
             CREATE USER MAPPING FOR PUBLIC SERVER {name}
               OPTIONS (url 'mqtts://relay:{password}@127.0.0.1:{tls_port}')",
            path("ca.pem"),
            path("client.pem"),
            path("client.key"),
        ))
        .expect("server");
    }
    let id = publish(&mut c, "m", "{}", None);
    let received = subscriber.wait(1);
    assert_eq!(received[0].topic, "secure/m");
    assert_eq!(received[0].property("id"), Some(id.as_str()));
    // A wrong password: the broker refuses the connection; an outage, nothing counted, and
    // neither password in the log.
    let refused = publish(&mut c, "wrong", "{}", None);
    common::wait_outage(&s.cluster, "wrong");
    let failures = common::failures(&mut c);
    assert_eq!(failures, 0, "a refused login is no event's fault");
    assert_eq!(
        common::pending(&mut c),
        1,
        "{refused} waits for the login to work"
    );
    assert_eq!(
        subscriber.received().len(),
        1,
        "nothing went out as \"wrong\""
    );
    // Fixed in the user mapping: it goes out.
    c.batch_execute(&format!(
        "ALTER USER MAPPING FOR PUBLIC SERVER wrong
           OPTIONS (SET url 'mqtts://relay:{PASSWORD}@127.0.0.1:{tls_port}')"
    ))
    .expect("fix the password");
    let received = subscriber.wait(2);
    assert_eq!(received[1].property("id"), Some(refused.as_str()));
    let log = s.cluster.log();
    assert!(
        !log.contains(PASSWORD) && !log.contains("nope-mqtt-pw"),
        "passwords stay out of the log"
    );
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}
