//! The ceilings the benchmark compares each backend's drain with: the same number of messages
//! of the same shape, published by a plain client loop of the crate the backend uses, with the
//! same confirmations and the same batching (1,000 in flight, then their confirmations). Also
//! the brokers' setup the benchmark needs, and a minimal webhook receiver.
//!
//! ```text
//! ceiling nats     <url> <subject>   <n>    JetStream publishes, acks awaited per 1,000
//! ceiling amqp     <url> <exchange> <routing key> <n>   confirms awaited per 1,000
//! ceiling mqtt     <host> <port> <topic> <n>            QoS 1, PUBACKs awaited per 1,000
//! ceiling webhook  <url> <n> <connections>              POSTs on kept-alive connections
//! ceiling kafka    <brokers> <topic> <n>                idempotent producer, reports per 1,000
//! ceiling nats-setup <url>            a stream BENCH taking bench.>
//! ceiling amqp-setup <url>            exchange bench (topic), queue bench bound with #
//! ceiling receiver <port>             answers every POST 204, until killed
//! ceiling listen-nats    <url> <subject> <n>             core subscription
//! ceiling listen-amqp    <url> <exchange> <key> <n>      a queue of its own, bound with <key>
//! ceiling listen-mqtt    <host> <port> <topic> <n>       QoS 1 subscription
//! ceiling listen-webhook <port> <n>                      answers every POST 204
//! ceiling listen-kafka   <brokers> <topic> <n>           from the end of each partition
//! ```
//!
//! The ceilings print `<kind> ceiling: <n> messages in <s> s = <rate>/s`. The listeners, for
//! the benchmark's commit-to-delivery latency, print `ready` once subscribed, then, after `<n>`
//! distinct ids or 60 s without a message, one line per message received, `<event id> <receipt
//! time, ns since the Unix epoch>`.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const WINDOW: usize = 1000;

/// A message body the size of the benchmark's events' data.
fn body(i: usize) -> Vec<u8> {
    format!(
        "{{\"order_id\": {i}, \"customer\": \"c-{}\", \"total\": 99.90, \"items\": [1, 2, 3]}}",
        i % 100
    )
    .into_bytes()
}

/// The binary-mode attributes the relay sends with each event, for the same weight.
fn attributes(i: usize) -> Vec<(String, String)> {
    vec![
        ("specversion".into(), "1.0".into()),
        ("id".into(), format!("00000000-0000-4000-8000-{i:012}")),
        ("source".into(), "/bench".into()),
        ("type".into(), "bench.event".into()),
        ("time".into(), "2026-12-01T00:00:00Z".into()),
        ("partitionkey".into(), format!("k{}", i % 100)),
    ]
}

fn report(kind: &str, n: usize, started: Instant) {
    let s = started.elapsed().as_secs_f64();
    println!(
        "{kind} ceiling: {n} messages in {s:.2} s = {:.0}/s",
        n as f64 / s
    );
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}

fn nats(url: &str, subject: &str, n: usize) {
    use async_nats::HeaderMap;
    let rt = runtime();
    rt.block_on(async {
        let client = async_nats::connect(url).await.expect("connect");
        let js = async_nats::jetstream::new(client);
        let started = Instant::now();
        for start in (0..n).step_by(WINDOW) {
            let mut acks = Vec::with_capacity(WINDOW);
            for i in start..(start + WINDOW).min(n) {
                let mut headers = HeaderMap::new();
                for (name, value) in attributes(i) {
                    headers.insert(format!("ce-{name}").as_str(), value.as_str());
                }
                headers.insert("Nats-Msg-Id", format!("ceiling-{i}").as_str());
                headers.insert("content-type", "application/json");
                let ack = js
                    .publish_with_headers(subject.to_string(), headers, body(i).into())
                    .await
                    .expect("publish");
                acks.push(ack);
            }
            for ack in acks {
                ack.await.expect("ack");
            }
        }
        report("nats", n, started);
    });
}

fn nats_setup(url: &str) {
    let rt = runtime();
    rt.block_on(async {
        let client = async_nats::connect(url).await.expect("connect");
        let js = async_nats::jetstream::new(client);
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "BENCH".into(),
            subjects: vec!["bench.>".into()],
            ..Default::default()
        })
        .await
        .expect("stream");
    });
}

fn amqp(url: &str, exchange: &str, key: &str, n: usize) {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    use lapin::types::{AMQPValue, FieldTable, LongString};
    let rt = runtime();
    rt.block_on(async {
        let c = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
            .await
            .expect("connect");
        let channel = c.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        let started = Instant::now();
        for start in (0..n).step_by(WINDOW) {
            let mut confirms = Vec::with_capacity(WINDOW);
            for i in start..(start + WINDOW).min(n) {
                let mut headers = FieldTable::default();
                for (name, value) in attributes(i) {
                    headers.insert(
                        format!("cloudEvents_{name}").into(),
                        AMQPValue::LongString(LongString::from(value)),
                    );
                }
                let properties = lapin::BasicProperties::default()
                    .with_message_id(format!("ceiling-{i}").into())
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2)
                    .with_headers(headers);
                let confirm = channel
                    .basic_publish(
                        exchange.into(),
                        key.into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..Default::default()
                        },
                        &body(i),
                        properties,
                    )
                    .await
                    .expect("publish");
                confirms.push(confirm);
            }
            for confirm in confirms {
                confirm.await.expect("confirm");
            }
        }
        report("amqp", n, started);
    });
}

fn amqp_setup(url: &str) {
    use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;
    let rt = runtime();
    rt.block_on(async {
        let c = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
            .await
            .expect("connect");
        let ch = c.create_channel().await.expect("channel");
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.exchange_declare(
            "bench".into(),
            lapin::ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await
        .expect("exchange");
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.queue_declare("bench".into(), durable, FieldTable::default())
            .await
            .expect("queue");
        ch.queue_bind(
            "bench".into(),
            "bench".into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    });
}

fn mqtt(host: &str, port: u16, topic: &str, n: usize) {
    use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let rt = runtime();
    rt.block_on(async {
        let mut options = MqttOptions::new("ceiling", host, port);
        options.set_outgoing_inflight_upper_limit(1000);
        let (client, mut events) = AsyncClient::new(options, 2000);
        // Connected.
        loop {
            if let Ok(Event::Incoming(Packet::ConnAck(_))) = events.poll().await {
                break;
            }
        }
        let started = Instant::now();
        for start in (0..n).step_by(WINDOW) {
            let end = (start + WINDOW).min(n);
            for i in start..end {
                let properties = PublishProperties {
                    content_type: Some("application/json".into()),
                    user_properties: attributes(i),
                    ..Default::default()
                };
                client
                    .publish_with_properties(topic, QoS::AtLeastOnce, false, body(i), properties)
                    .await
                    .expect("publish");
            }
            let mut acked = 0;
            while acked < end - start {
                if let Event::Incoming(Packet::PubAck(_)) = events.poll().await.expect("poll") {
                    acked += 1;
                }
            }
        }
        report("mqtt", n, started);
    });
}

/// The relay's producer settings (src/backend/kafka.rs), without its timeouts.
fn kafka_config(brokers: &str) -> rdkafka::ClientConfig {
    let mut config = rdkafka::ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "1");
    config
}

fn kafka(brokers: &str, topic: &str, n: usize) {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
    use std::sync::atomic::{AtomicUsize, Ordering};
    #[derive(Default)]
    struct Reports(AtomicUsize);
    impl rdkafka::ClientContext for Reports {}
    impl ProducerContext for Reports {
        type DeliveryOpaque = ();
        fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
            if let Err((e, _)) = result {
                panic!("not delivered: {e}");
            }
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
    let producer: BaseProducer<Reports> = kafka_config(brokers)
        .create_with_context(Reports::default())
        .expect("producer");
    // Connected, the topic known.
    producer
        .client()
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let started = Instant::now();
    for start in (0..n).step_by(WINDOW) {
        let end = (start + WINDOW).min(n);
        for i in start..end {
            let mut headers = OwnedHeaders::new();
            for (name, value) in attributes(i) {
                headers = headers.insert(Header {
                    key: &format!("ce_{name}"),
                    value: Some(&value),
                });
            }
            headers = headers.insert(Header {
                key: "content-type",
                value: Some("application/json"),
            });
            let value = body(i);
            let record = BaseRecord::<(), _>::to(topic)
                .payload(&value)
                .headers(headers);
            producer.send(record).map_err(|(e, _)| e).expect("send");
        }
        while producer.context().0.load(Ordering::Relaxed) < end {
            producer.poll(Duration::from_millis(1));
        }
    }
    report("kafka", n, started);
}

fn webhook(url: &str, n: usize, connections: usize) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .max_idle_connections_per_host(connections)
        .build()
        .into();
    let started = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..connections {
            let agent = agent.clone();
            scope.spawn(move || {
                for i in (t..n).step_by(connections) {
                    let mut request = http::Request::post(url)
                        .header("content-type", "application/json")
                        .header("webhook-id", format!("ceiling-{i}"));
                    for (name, value) in attributes(i) {
                        request = request.header(format!("ce-{name}"), value);
                    }
                    let request = request.body(body(i)).expect("request");
                    let mut response = agent.run(request).expect("post");
                    let _ = response.body_mut().read_to_vec();
                }
            });
        }
    });
    report("webhook", n, started);
}

/// Answers every request 204, one thread per connection, until killed.
fn receiver(port: u16) {
    serve(bind(port), |_| {});
}

fn bind(port: u16) -> std::net::TcpListener {
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind")
}

/// Serves HTTP/1.1 on `listener`, answering every request 204 after `seen(its webhook-id)`,
/// one thread per connection, until killed.
fn serve(listener: std::net::TcpListener, seen: impl Fn(Option<String>) + Clone + Send + 'static) {
    for stream in listener.incoming().flatten() {
        let seen = seen.clone();
        std::thread::spawn(move || {
            let mut stream = stream;
            let mut buffer: Vec<u8> = Vec::new();
            let mut chunk = [0u8; 65536];
            loop {
                let mut headers = [httparse::EMPTY_HEADER; 64];
                let mut request = httparse::Request::new(&mut headers);
                if let Ok(httparse::Status::Complete(head)) = request.parse(&buffer) {
                    let header = |name: &str| {
                        request
                            .headers
                            .iter()
                            .find(|h| h.name.eq_ignore_ascii_case(name))
                            .and_then(|h| std::str::from_utf8(h.value).ok())
                            .map(str::to_string)
                    };
                    let length: usize = header("content-length")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    if buffer.len() >= head + length {
                        seen(header("webhook-id"));
                        buffer.drain(..head + length);
                        if stream
                            .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                            .is_err()
                        {
                            return;
                        }
                        continue;
                    }
                }
                match stream.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(k) => buffer.extend_from_slice(&chunk[..k]),
                }
            }
        });
    }
}

/// A listener's output: `ready`, then, once done, `<id> <ns>` per distinct id received. Kept
/// in memory until then: printed as they come, the lines would fill the pipe the benchmark
/// reads only at the end, and the listener would stall on it (measured: a 1.7 s stall after
/// about 1,100 lines, in every backend's p99).
struct Listened {
    ids: HashSet<String>,
    lines: String,
    n: usize,
}

impl Listened {
    fn ready(n: usize) -> Listened {
        println!("ready");
        let _ = std::io::stdout().flush();
        Listened {
            ids: HashSet::new(),
            lines: String::new(),
            n,
        }
    }

    /// Records `id` as received now; true once `n` distinct ids have been.
    fn received(&mut self, id: Option<String>) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        if let Some(id) = id {
            if !self.ids.contains(&id) {
                self.lines.push_str(&format!("{id} {now}\n"));
                self.ids.insert(id);
            }
        }
        self.ids.len() >= self.n
    }
}

impl Drop for Listened {
    fn drop(&mut self) {
        print!("{}", self.lines);
        let _ = std::io::stdout().flush();
    }
}

/// How long a listener waits for a message before it gives up.
const QUIET: Duration = Duration::from_secs(60);

fn listen_nats(url: &str, subject: &str, n: usize) {
    use futures_lite::StreamExt;
    let rt = runtime();
    rt.block_on(async {
        let client = async_nats::connect(url).await.expect("connect");
        let mut messages = client
            .subscribe(subject.to_string())
            .await
            .expect("subscribe");
        client.flush().await.expect("flush");
        let mut listened = Listened::ready(n);
        while let Ok(Some(m)) = tokio::time::timeout(QUIET, messages.next()).await {
            let id = m
                .headers
                .as_ref()
                .and_then(|h| h.get("ce-id"))
                .map(|v| v.to_string());
            if listened.received(id) {
                break;
            }
        }
    });
}

fn listen_amqp(url: &str, exchange: &str, key: &str, n: usize) {
    use futures_lite::StreamExt;
    use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;
    let rt = runtime();
    rt.block_on(async {
        let c = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
            .await
            .expect("connect");
        let ch = c.create_channel().await.expect("channel");
        let own = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        };
        let queue = ch
            .queue_declare("".into(), own, FieldTable::default())
            .await
            .expect("queue");
        ch.queue_bind(
            queue.name().clone(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
        let no_ack = BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        };
        let mut deliveries = ch
            .basic_consume(
                queue.name().clone(),
                "".into(),
                no_ack,
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let mut listened = Listened::ready(n);
        while let Ok(Some(Ok(m))) = tokio::time::timeout(QUIET, deliveries.next()).await {
            let id = m.properties.message_id().as_ref().map(|s| s.to_string());
            if listened.received(id) {
                break;
            }
        }
    });
}

fn listen_mqtt(host: &str, port: u16, topic: &str, n: usize) {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let rt = runtime();
    rt.block_on(async {
        let options = MqttOptions::new("listener", host, port);
        let (client, mut events) = AsyncClient::new(options, 100);
        client
            .subscribe(topic, QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        let mut listened = None;
        while let Ok(event) = tokio::time::timeout(QUIET, events.poll()).await {
            match event.expect("poll") {
                Event::Incoming(Packet::SubAck(_)) => listened = Some(Listened::ready(n)),
                Event::Incoming(Packet::Publish(p)) => {
                    let id = p.properties.and_then(|properties| {
                        properties
                            .user_properties
                            .into_iter()
                            .find(|(name, _)| name == "id")
                            .map(|(_, value)| value)
                    });
                    if let Some(listened) = listened.as_mut() {
                        if listened.received(id) {
                            break;
                        }
                    }
                }
                _ => {}
            }
        }
    });
}

fn listen_kafka(brokers: &str, topic: &str, n: usize) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    use rdkafka::{Offset, TopicPartitionList};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "bench-listener")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "1")
        .create()
        .expect("consumer");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let mut partitions = TopicPartitionList::new();
    for topic in metadata.topics() {
        for partition in topic.partitions() {
            partitions
                .add_partition_offset(topic.name(), partition.id(), Offset::End)
                .expect("partition");
        }
    }
    consumer.assign(&partitions).expect("assign");
    // Assigned at the end: wait until each partition's position is known.
    let started = Instant::now();
    while consumer
        .position()
        .map(|p| p.elements().iter().any(|e| e.offset() == Offset::End))
        .unwrap_or(true)
        && started.elapsed() < Duration::from_secs(10)
    {
        let _ = consumer.poll(Duration::from_millis(10));
    }
    let mut listened = Listened::ready(n);
    let mut quiet = Instant::now();
    while quiet.elapsed() < QUIET {
        let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        quiet = Instant::now();
        let id = message.headers().and_then(|headers| {
            headers
                .iter()
                .find(|h| h.key == "ce_id")
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        });
        if listened.received(id) {
            break;
        }
    }
}

fn listen_webhook(port: u16, n: usize) {
    let (tx, rx) = std::sync::mpsc::channel();
    let listener = bind(port);
    std::thread::spawn(move || {
        serve(listener, move |id| {
            let _ = tx.send(id);
        })
    });
    let mut listened = Listened::ready(n);
    while let Ok(id) = rx.recv_timeout(QUIET) {
        if listened.received(id) {
            break;
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or_default();
    let number = |i: usize| arg(i).parse::<usize>().expect("a number");
    match arg(0) {
        "nats" => nats(arg(1), arg(2), number(3)),
        "nats-setup" => nats_setup(arg(1)),
        "amqp" => amqp(arg(1), arg(2), arg(3), number(4)),
        "amqp-setup" => amqp_setup(arg(1)),
        "mqtt" => mqtt(arg(1), number(2) as u16, arg(3), number(4)),
        "webhook" => webhook(arg(1), number(2), number(3)),
        "kafka" => kafka(arg(1), arg(2), number(3)),
        "listen-kafka" => listen_kafka(arg(1), arg(2), number(3)),
        "receiver" => receiver(number(1) as u16),
        "listen-nats" => listen_nats(arg(1), arg(2), number(3)),
        "listen-amqp" => listen_amqp(arg(1), arg(2), arg(3), number(4)),
        "listen-mqtt" => listen_mqtt(arg(1), number(2) as u16, arg(3), number(4)),
        "listen-webhook" => listen_webhook(number(1) as u16, number(2)),
        other => {
            eprintln!("ceiling: unknown command {other:?}; see bench/ceiling.rs");
            std::process::exit(2);
        }
    }
}
