//! The `webhook` backend end to end, against an HTTP receiver this test runs on loopback: every
//! CloudEvents attribute in binary, structured and batched mode, parsed back with the
//! CloudEvents SDK; Standard Webhooks signatures checked with a key from a user mapping; a
//! refused event dead while others flow, 5xx counted against nothing; the receiver killed and
//! restarted mid-drain with nothing lost.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use base64::Engine;
use cloudevents::AttributesReader;
use common::{wait_for, PgClient, Setup, Tally, DEADLINE};
use hmac::{Hmac, Mac};

/// The Standard Webhooks test key (`whsec_` and base64).
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// One request as the receiver read it.
#[derive(Clone, Debug)]
struct Received {
    path: String,
    headers: http::HeaderMap,
    body: Vec<u8>,
    /// What the receiver answered.
    status: u16,
}

impl Received {
    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    /// The events it carries, parsed by the CloudEvents SDK: binary or structured mode through
    /// its HTTP binding, batched mode as a JSON array of structured events.
    fn events(&self) -> Vec<cloudevents::Event> {
        let batch = self
            .header("content-type")
            .is_some_and(|t| t.starts_with("application/cloudevents-batch+json"));
        if batch {
            serde_json::from_slice(&self.body).expect("a CloudEvents JSON batch")
        } else {
            vec![
                cloudevents::binding::http::to_event(&self.headers, self.body.clone())
                    .expect("the SDK reads the request as a CloudEvent"),
            ]
        }
    }
}

type Answer = Arc<dyn Fn(&Received) -> u16 + Send + Sync>;

/// An HTTP/1.1 receiver with kept-alive connections, answering each request as `answer` says
/// and keeping every request it answered.
struct Receiver {
    port: u16,
    /// Set: HTTPS, with a client certificate required.
    tls: Option<Arc<openssl::ssl::SslAcceptor>>,
    received: Arc<Mutex<Vec<Received>>>,
    answer: Arc<Mutex<Answer>>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Receiver {
    fn start() -> Receiver {
        Self::start_with(None)
    }

    /// HTTPS with `server.pem`/`server.key` of `certificates` ([`common::make_certificates`]),
    /// requiring a client certificate signed by its `ca.pem`.
    fn start_mutual_tls(certificates: &std::path::Path) -> Receiver {
        use openssl::ssl::{SslAcceptor, SslFiletype, SslMethod, SslVerifyMode};
        let mut acceptor =
            SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).expect("acceptor");
        acceptor
            .set_certificate_chain_file(certificates.join("server.pem"))
            .expect("server.pem");
        acceptor
            .set_private_key_file(certificates.join("server.key"), SslFiletype::PEM)
            .expect("server.key");
        acceptor
            .set_ca_file(certificates.join("ca.pem"))
            .expect("ca.pem");
        acceptor.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
        Self::start_with(Some(Arc::new(acceptor.build())))
    }

    fn start_with(tls: Option<Arc<openssl::ssl::SslAcceptor>>) -> Receiver {
        let mut r = Receiver {
            port: common::free_port(),
            tls,
            received: Arc::default(),
            answer: Arc::new(Mutex::new(Arc::new(|_: &Received| 204))),
            stop: Arc::default(),
            accept: None,
        };
        r.listen();
        r
    }

    fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    fn answer_with(&self, answer: impl Fn(&Received) -> u16 + Send + Sync + 'static) {
        *self.answer.lock().expect("answer") = Arc::new(answer);
    }

    fn listen(&mut self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).expect("bind the receiver");
        listener.set_nonblocking(true).expect("nonblocking");
        self.stop = Arc::default();
        let (stop, received, answer, tls) = (
            Arc::clone(&self.stop),
            Arc::clone(&self.received),
            Arc::clone(&self.answer),
            self.tls.clone(),
        );
        self.accept = Some(std::thread::spawn(move || {
            let mut connections = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (stop, received, answer, tls) = (
                            Arc::clone(&stop),
                            Arc::clone(&received),
                            Arc::clone(&answer),
                            tls.clone(),
                        );
                        connections.push(std::thread::spawn(move || {
                            let _ = stream.set_nonblocking(false);
                            let _ = stream.set_read_timeout(Some(Duration::from_millis(20)));
                            match tls {
                                None => serve(stream, &stop, &received, &answer),
                                Some(acceptor) => {
                                    // The handshake with a longer timeout than the reads'.
                                    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                                    let Ok(stream) = acceptor.accept(stream) else {
                                        return;
                                    };
                                    let _ = stream
                                        .get_ref()
                                        .set_read_timeout(Some(Duration::from_millis(20)));
                                    serve(stream, &stop, &received, &answer)
                                }
                            }
                        }));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            for c in connections {
                let _ = c.join();
            }
        }));
    }

    /// As a crash: the port closes, and every connection with it, requests unanswered.
    fn kill(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }

    fn restart(&mut self) {
        self.kill();
        self.listen();
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().expect("received").clone()
    }

    /// The ids of the events delivered (answered 2xx), in arrival order.
    fn delivered_ids(&self) -> Vec<String> {
        self.received()
            .iter()
            .filter(|r| (200..300).contains(&r.status))
            .flat_map(|r| r.events())
            .map(|e| e.id().to_string())
            .collect()
    }

    fn wait_delivered(&self, n: usize) -> Vec<String> {
        wait_for(&format!("{n} events delivered"), DEADLINE, || {
            let ids = self.delivered_ids();
            (ids.len() >= n).then_some(ids)
        })
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Serves one connection until it closes or the receiver stops.
fn serve(
    mut stream: impl Read + Write,
    stop: &AtomicBool,
    received: &Mutex<Vec<Received>>,
    answer: &Mutex<Answer>,
) {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    loop {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        // A whole request in the buffer: answer it.
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut request = httparse::Request::new(&mut headers);
        if let Ok(httparse::Status::Complete(head)) = request.parse(&buffer) {
            let mut map = http::HeaderMap::new();
            for h in request.headers.iter() {
                if let (Ok(name), Ok(value)) = (
                    http::HeaderName::from_bytes(h.name.as_bytes()),
                    http::HeaderValue::from_bytes(h.value),
                ) {
                    map.append(name, value);
                }
            }
            let length: usize = map
                .get("content-length")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if buffer.len() >= head + length {
                let mut r = Received {
                    path: request.path.unwrap_or_default().to_string(),
                    headers: map,
                    body: buffer[head..head + length].to_vec(),
                    status: 0,
                };
                buffer.drain(..head + length);
                let answer = Arc::clone(&answer.lock().expect("answer"));
                r.status = answer(&r);
                received.lock().expect("received").push(r.clone());
                let reply = format!(
                    "HTTP/1.1 {} Answer\r\ncontent-length: 2\r\n\r\nno",
                    r.status
                );
                if stream.write_all(reply.as_bytes()).is_err() {
                    return;
                }
                continue;
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// `v1,` and the base64 HMAC-SHA256 of `id.timestamp.body` (Standard Webhooks), computed here
/// independently of the relay.
fn expected_signature(id: &str, timestamp: &str, body: &[u8]) -> String {
    let key = base64::engine::general_purpose::STANDARD
        .decode(SECRET.trim_start_matches("whsec_"))
        .expect("key");
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).expect("hmac");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

fn create_webhook_server(c: &mut PgClient, name: &str, url: &str, options: &str) {
    c.batch_execute(&format!(
        "CREATE SERVER {name} FOREIGN DATA WRAPPER broadcaster \
           OPTIONS (backend 'webhook', url '{url}'{options});
         CREATE USER MAPPING FOR PUBLIC SERVER {name} OPTIONS (secret '{SECRET}')"
    ))
    .expect("create webhook server");
}

fn publish(c: &mut PgClient, backend: &str, ty: &str, key: Option<&str>) -> String {
    c.query_one(
        "SELECT broadcaster_publish($1, '{\"n\": 1}'::jsonb, partition_key => $2, backend => $3)::text",
        &[&ty, &key, &backend],
    )
    .expect("publish")
    .get(0)
}

#[test]
fn every_attribute_arrives_in_binary_structured_and_batched_mode_signed() {
    let s = Setup::new(&[]);
    let receiver = Receiver::start();
    let mut c = s.cluster.connect();
    let base = receiver.url();
    create_webhook_server(&mut c, "bin", &format!("{base}/bin"), "");
    create_webhook_server(
        &mut c,
        "str",
        &format!("{base}/str/"),
        ", message_mode 'structured'",
    );
    create_webhook_server(
        &mut c,
        "batch",
        &format!("{base}/batch"),
        ", message_mode 'batched', stream 'all'",
    );
    // Every attribute, a subject the binding must percent-encode, and data whose text
    // (spacing, key order, digits) must arrive unchanged.
    let data = r#"{"b": 1, "a": [1.50, "x"], "big": 12345678901234567890}"#;
    let mut ids = HashMap::new();
    for backend in ["bin", "str", "batch"] {
        let id: String = c
            .query_one(
                "INSERT INTO broadcaster_outbox (type, source, subject, dataschema, data,
                    partition_key, extensions, stream, backend)
                 VALUES ('order.created', '/shop', 'Zürich 100% \"x\"', 'https://example.com/order.json',
                    $1::text::json, 'o-1', '{\"tenant\": \"acme\", \"priority\": 3}', 'orders/eu', $2)
                 RETURNING id::text",
                &[&data, &backend],
            )
            .expect("insert")
            .get(0);
        ids.insert(backend, id);
    }
    // Two more in batched mode, to the server's stream, so that one request carries several.
    let mut batch_more = Vec::new();
    c.batch_execute("BEGIN").expect("begin");
    for _ in 0..2 {
        let id: String = c
            .query_one(
                "SELECT broadcaster_publish('t', '{}'::jsonb, backend => 'batch')::text",
                &[],
            )
            .expect("publish")
            .get(0);
        batch_more.push(id);
    }
    c.batch_execute("COMMIT").expect("commit");
    receiver.wait_delivered(5);

    let received = receiver.received();
    let find =
        |path: &str| -> Vec<&Received> { received.iter().filter(|r| r.path == path).collect() };
    // Binary mode: attributes in ce-* headers, the data's text as the body.
    let bin = find("/bin/orders%2Feu");
    assert_eq!(bin.len(), 1, "{received:?}");
    let r = bin[0];
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(r.body, data.as_bytes(), "the stored text, unchanged");
    assert_eq!(
        r.header("ce-subject").as_deref(),
        Some("Z%C3%BCrich%20100%25%20%22x%22"),
        "percent-encoded as the HTTP binding asks"
    );
    // Structured mode: one JSON event.
    let structured = find("/str/orders%2Feu");
    assert_eq!(structured.len(), 1, "{received:?}");
    assert!(structured[0]
        .header("content-type")
        .is_some_and(|t| t.starts_with("application/cloudevents+json")));
    // Batched mode: the event with its own stream alone, the two of the server's stream together.
    let batched = find("/batch/orders%2Feu");
    assert_eq!(batched.len(), 1, "{received:?}");
    let together = find("/batch/all");
    let together_ids: Vec<String> = together
        .iter()
        .flat_map(|r| r.events())
        .map(|e| e.id().to_string())
        .collect();
    assert_eq!(together_ids, batch_more, "both, in one request, in order");
    assert_eq!(together.len(), 1, "one request for both");

    for (backend, request) in [("bin", r), ("str", structured[0]), ("batch", batched[0])] {
        let events = request.events();
        assert_eq!(events.len(), 1);
        let e = &events[0];
        assert_eq!(e.id(), ids[backend], "{backend}");
        assert_eq!(e.ty(), "order.created");
        assert_eq!(e.source().to_string(), "/shop");
        assert_eq!(e.specversion().as_str(), "1.0");
        assert_eq!(e.datacontenttype(), Some("application/json"));
        assert!(e.time().is_some());
        let subject = e.subject().map(|s| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        });
        assert_eq!(subject.as_deref(), Some("Zürich 100% \"x\""), "{backend}");
        assert_eq!(
            e.dataschema().map(|u| u.to_string()).as_deref(),
            Some("https://example.com/order.json"),
            "{backend}"
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

    // Standard Webhooks: the id is the event's, the signature verifies with the mapping's key.
    for request in &received {
        let id = request.header("webhook-id").expect("webhook-id");
        let timestamp = request
            .header("webhook-timestamp")
            .expect("webhook-timestamp");
        let age = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs()
            .abs_diff(timestamp.parse::<u64>().expect("seconds"));
        assert!(age < 120, "a timestamp of now: {timestamp}");
        assert_eq!(
            request.header("webhook-signature"),
            Some(expected_signature(&id, &timestamp, &request.body)),
            "{request:?}"
        );
        let events = request.events();
        if events.len() == 1 {
            assert_eq!(id, events[0].id());
        }
    }
    // Nothing left behind.
    let left: i64 = c
        .query_one("SELECT count(*) FROM broadcaster_outbox", &[])
        .expect("count")
        .get(0);
    assert_eq!(left, 0);
}

#[test]
fn servers_keep_signing_keys_out_of_their_options() {
    let s = Setup::new(&[]);
    let mut c = s.cluster.connect();
    let code = |c: &mut PgClient, sql: &str| match c.batch_execute(sql) {
        Ok(()) => "ok".to_string(),
        Err(e) => e.code().map_or("?".into(), |s| s.code().to_string()),
    };
    let cases = [
        // Every role reads a server's options: a key or a password there is refused.
        ("CREATE SERVER w FOREIGN DATA WRAPPER broadcaster OPTIONS (backend 'webhook', url 'http://h/', secret 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw')", "22023"),
        ("CREATE SERVER w FOREIGN DATA WRAPPER broadcaster OPTIONS (backend 'webhook', url 'https://u:pw@h/')", "22023"),
        ("CREATE SERVER w FOREIGN DATA WRAPPER broadcaster OPTIONS (backend 'webhook', url 'mqtt://h/')", "22023"),
        ("CREATE SERVER w FOREIGN DATA WRAPPER broadcaster OPTIONS (backend 'webhook', url 'http://h/', message_mode 'xml')", "22023"),
        ("CREATE SERVER w FOREIGN DATA WRAPPER broadcaster OPTIONS (backend 'webhook', url 'http://h/', stream '..')", "22023"),
        ("CREATE SERVER w FOREIGN DATA WRAPPER broadcaster OPTIONS (backend 'webhook', url 'http://h/', maxlen '1')", "HV00D"),
        // The URL may wait for the mapping, with its password.
        ("CREATE SERVER w FOREIGN DATA WRAPPER broadcaster OPTIONS (backend 'webhook')", "ok"),
        ("CREATE USER MAPPING FOR PUBLIC SERVER w OPTIONS (url 'https://u:pw@h/', secret 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw')", "ok"),
    ];
    for (sql, want) in cases {
        assert_eq!(code(&mut c, sql), want, "{sql}");
    }
    // A mapping's options are not for every role to read.
    let mut nosy = s.cluster.connect_as_new_role("nosy");
    let seen: Vec<String> = nosy
        .query(
            "SELECT coalesce(array_to_string(umoptions, ','), '') FROM pg_user_mappings",
            &[],
        )
        .expect("pg_user_mappings")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        seen.iter().all(|o| !o.contains("whsec_")),
        "a non-owner sees {seen:?}"
    );
}

#[test]
fn a_refused_event_goes_dead_while_others_flow_and_a_5xx_counts_nothing() {
    let s = Setup::new(&[
        ("broadcaster.max_attempts", "2"),
        ("broadcaster.poll_interval", "200ms"),
        ("broadcaster.retry_max_delay", "1s"),
    ]);
    let receiver = Receiver::start();
    let mut c = s.cluster.connect();
    create_webhook_server(&mut c, "hooks", &receiver.url(), "");
    // First, the receiver is overloaded: every request answered 503.
    receiver.answer_with(|_| 503);
    let first = publish(&mut c, "hooks", "t", Some("a"));
    wait_for("the 503s", DEADLINE, || {
        (receiver.received().len() >= 3).then_some(())
    });
    let counted = common::failures(&mut c);
    assert_eq!(counted, 0, "a 503 is an outage, never the event's fault");
    let last_error: Option<String> = c
        .query_one(
            "SELECT last_error FROM broadcaster_status WHERE backend = 'hooks'",
            &[],
        )
        .ok()
        .and_then(|r| r.get(0));
    assert!(
        last_error
            .as_deref()
            .is_some_and(|e| e.contains("HTTP 503")),
        "status says why: {last_error:?}"
    );
    // Then it refuses one kind of event (422) and takes the rest.
    receiver.answer_with(|r| {
        if r.header("ce-type").as_deref() == Some("poison") {
            422
        } else {
            200
        }
    });
    let poison = publish(&mut c, "hooks", "poison", Some("p"));
    let mut others = vec![first];
    for i in 0..20 {
        others.push(publish(&mut c, "hooks", "t", Some(&format!("k{i}"))));
    }
    let delivered = receiver.wait_delivered(others.len());
    Tally::count(&others, &delivered).assert_exactly_once("webhook, poison beside");
    let (attempts, error) = common::wait_dead(&mut c, &poison);
    assert_eq!(attempts, 2);
    assert!(error.contains("HTTP 422"), "{error}");
}

#[test]
fn the_receiver_killed_and_restarted_mid_drain_loses_nothing() {
    let s = Setup::new(&[
        ("broadcaster.poll_interval", "200ms"),
        ("broadcaster.retry_max_delay", "1s"),
        ("broadcaster.network_timeout", "1s"),
    ]);
    let mut receiver = Receiver::start();
    let mut c = s.cluster.connect();
    create_webhook_server(
        &mut c,
        "hooks",
        &receiver.url(),
        ", message_mode 'structured'",
    );
    // 2,000 events of 50 keys, committed 100 per transaction, while the receiver is killed
    // once a quarter have arrived, and restarted a second later.
    const TOTAL: usize = 2000;
    let mut produced = Vec::with_capacity(TOTAL);
    let mut order: HashMap<String, Vec<String>> = HashMap::new();
    let mut killed = false;
    let mut pending_at_kill = 0;
    for chunk in 0..TOTAL / 100 {
        c.batch_execute("BEGIN").expect("begin");
        for i in 0..100 {
            let key = format!("k{}", (chunk * 100 + i) % 50);
            let id = publish(&mut c, "hooks", "t", Some(&key));
            order.entry(key).or_default().push(id.clone());
            produced.push(id);
        }
        c.batch_execute("COMMIT").expect("commit");
        if !killed && receiver.delivered_ids().len() >= TOTAL / 4 {
            receiver.kill();
            killed = true;
            pending_at_kill = common::pending(&mut c);
            std::thread::sleep(Duration::from_secs(1));
            receiver.restart();
        }
    }
    if !killed {
        receiver.wait_delivered(TOTAL / 4);
        receiver.kill();
        pending_at_kill = common::pending(&mut c);
        std::thread::sleep(Duration::from_secs(1));
        receiver.restart();
    }
    assert!(
        pending_at_kill > 0,
        "the receiver died with events still to send"
    );
    let delivered = wait_for("every event delivered", DEADLINE, || {
        let ids = receiver.delivered_ids();
        let unique: HashSet<&String> = ids.iter().collect();
        (unique.len() >= TOTAL).then_some(ids)
    });
    let tally = Tally::count(&produced, &delivered);
    tally.assert_none_lost("webhook, receiver killed mid-drain");
    assert!(
        s.cluster.log().contains("broker unavailable"),
        "the relay met the dead receiver"
    );
    // Duplicates only of an event already delivered, with its id; and each key's events in
    // commit order (by first arrival).
    common::assert_commit_order(&delivered, &order);
}

#[test]
fn https_with_a_client_certificate_and_basic_authentication() {
    let dir = std::path::PathBuf::from(format!("/tmp/bc-webhook-tls-{}", std::process::id()));
    common::make_certificates(&dir);
    let path = |f: &str| dir.join(f).to_string_lossy().into_owned();
    let s = Setup::new(&[
        ("broadcaster.poll_interval", "200ms"),
        ("broadcaster.retry_max_delay", "1s"),
    ]);
    let receiver = Receiver::start_mutual_tls(&dir);
    let mut c = s.cluster.connect();
    let url = receiver.url();
    let password_url = url.replacen("https://", "https://relay:p%40ss%3Aw0rd@", 1);
    // Trusting the test's CA, presenting its client certificate; the password in the mapping.
    c.batch_execute(&format!(
        "CREATE SERVER tls FOREIGN DATA WRAPPER broadcaster
           OPTIONS (backend 'webhook', url '{url}/in', tls_ca_file '{}',
                    tls_cert_file '{}', tls_key_file '{}');
         CREATE USER MAPPING FOR PUBLIC SERVER tls OPTIONS (url '{password_url}/in');
         CREATE SERVER untrusting FOREIGN DATA WRAPPER broadcaster
           OPTIONS (backend 'webhook', url '{url}/in');
         CREATE USER MAPPING FOR PUBLIC SERVER untrusting OPTIONS (url '{password_url}/in')",
        path("ca.pem"),
        path("client.pem"),
        path("client.key"),
    ))
    .expect("servers");
    let id = publish(&mut c, "tls", "over.https", None);
    let ids = receiver.wait_delivered(1);
    assert_eq!(ids, [id]);
    let request = &receiver.received()[0];
    assert_eq!(request.path, "/in");
    // relay:p@ss:w0rd, decoded from the URL and sent as Basic authentication.
    assert_eq!(
        request.header("authorization").as_deref(),
        Some("Basic cmVsYXk6cEBzczp3MHJk")
    );
    // Without the CA, the receiver's certificate is not trusted: an outage, nothing counted,
    // nothing sent.
    let refused = publish(&mut c, "untrusting", "not.sent", None);
    wait_for("the untrusted certificate in the log", DEADLINE, || {
        s.cluster
            .log()
            .lines()
            .any(|l| l.contains("broker unavailable") && l.contains("certificate verify failed"))
            .then_some(())
    });
    let failures = common::failures(&mut c);
    assert_eq!(
        failures, 0,
        "a certificate the relay does not trust is no event's fault"
    );
    assert!(!receiver.delivered_ids().contains(&refused));
    let log = s.cluster.log();
    assert!(
        !log.contains("p%40ss") && !log.contains("p@ss"),
        "the password stays out of the log"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
