//! Kafka backend: each event produced by librdkafka's idempotent producer (`acks=all`, the
//! broker de-duplicating the client's own retries by producer id and sequence) and counted
//! delivered once its partition leader has written it, in the CloudEvents Kafka protocol
//! binding (binary mode: attributes as `ce_` headers, the data's content type as the
//! `content-type` header; or structured mode). The event's partition key is the record's key,
//! hashed as the Java client hashes it (murmur2), so that a key's events share a partition and
//! keep their order there. A batch is handed to the client whole before its delivery reports
//! are awaited.
//!
//! ```sql
//! CREATE SERVER orders FOREIGN DATA WRAPPER broadcaster
//!   OPTIONS (backend 'kafka', url 'kafka://broker1:9092,broker2:9092', stream 'orders');
//! ```
//!
//! Where an event goes: its `stream` (or the server's `stream` option) is the topic. A record
//! the broker refuses for itself (too large, invalid, not authorized for the topic, no such
//! topic) is the event's fault; no broker, no report within [`record_timeout`] (twice
//! `network_timeout`, at least 2 s: a new client connects and gets its producer id first;
//! librdkafka times each record out, the batch waits a second more), or any other broker
//! error is an outage. The idempotent producer drops duplicates only within one
//! producer session: a batch sent again after an outage may land twice, with the same `ce_id`
//! (or `id`) for consumers to drop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{
    BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig,
};

use super::binding::Mode;
use super::{
    binding, Backend, BatchError, Config, ConfigError, Options, Outcome, PublisherBackend,
};
use crate::event::OutboxEvent;

/// How long one [`BaseProducer::poll`] serves the client's reports: it returns only then, so
/// this is also the most a delivered batch waits to be seen as delivered.
const POLL: Duration = Duration::from_millis(1);

/// The structured mode's `content-type` header (Kafka binding 3.2.1).
const STRUCTURED: &str = "application/cloudevents+json; charset=UTF-8";

/// `CREATE SERVER ... OPTIONS (backend 'kafka', url '...', ...)`.
#[derive(Clone)]
pub struct KafkaConfig {
    /// From `url`: the bootstrap brokers, `host:port,host:port` (port 9092 by default).
    pub brokers: String,
    /// From `url`'s scheme: `kafka://` plain, `kafka+ssl://` TLS.
    pub tls: bool,
    /// From `url`'s user information: SASL's user name and password. Secret: a URL with a
    /// password belongs in a `USER MAPPING`.
    pub credentials: Option<(String, String)>,
    /// `sasl_mechanism`: `SCRAM-SHA-512` (the default), `SCRAM-SHA-256` or `PLAIN`; used when
    /// `url` has a user.
    pub sasl_mechanism: String,
    /// `stream`: the topic of events whose `stream` column is NULL. Default
    /// `broadcaster.<server>`.
    pub topic: String,
    /// `stream_prefix`: every topic an event names must start with this; empty: any.
    pub stream_prefix: String,
    /// `message_mode`: `binary` (the default: attributes as `ce_<name>` headers in UTF-8, the
    /// data's content type as `content-type`, the data as the value) or `structured`
    /// (`application/cloudevents+json; charset=UTF-8`).
    pub mode: Mode,
    /// `network_timeout` (milliseconds): bound on connecting, and on each request. A record's
    /// delivery report is awaited for longer, see [`record_timeout`].
    pub timeout: Duration,
    /// `client_id`: default `broadcaster-<system identifier, hex>-<database>-<server>`; brokers
    /// log and apply quotas by it.
    pub client_id: String,
    /// `tls_ca_file`: CA certificates (PEM) to trust instead of the system's.
    pub tls_ca_file: String,
    /// `tls_cert_file`, `tls_key_file`: client certificate and key (PEM) for mutual TLS.
    pub tls_cert_file: String,
    pub tls_key_file: String,
}

impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("tls", &self.tls)
            .field("topic", &self.topic)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

/// How long a record's delivery report is awaited from the moment it is handed to the client
/// (librdkafka's `message.timeout.ms`): twice `network_timeout`, and at least 2 s. A new
/// client connects (TLS, SASL, metadata, then each partition leader) and gets its producer id
/// before it sends a record, and librdkafka waits about 0.5 s before it connects to a broker
/// the metadata named and about as long again before it asks for the producer id, whatever the
/// network. Through TLS and SCRAM on loopback, Confluent's Python client took 1.07 s for its
/// first record; with this bound at 1 s the relay never delivered there, since each timeout
/// also starts a new client.
pub fn record_timeout(network_timeout: Duration) -> Duration {
    (network_timeout * 2).max(Duration::from_secs(2))
}

/// Whether `topic` is a Kafka topic name a record can be produced to: 1 to 249 characters of
/// `a-z A-Z 0-9 . _ -`, not `.` or `..` (Kafka's `Topic.validate`); and not starting with `__`,
/// which Kafka keeps for its own topics (`__consumer_offsets`, `__transaction_state`).
pub fn check_topic(topic: &str) -> Result<(), String> {
    let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if topic.is_empty() || topic.len() > 249 || !topic.chars().all(legal) {
        return Err(format!(
            "{topic:?} is not a Kafka topic name: 1 to 249 characters of a-z, A-Z, 0-9, '.', '_' and '-'"
        ));
    }
    if topic == "." || topic == ".." || topic.starts_with("__") {
        return Err(format!(
            "{topic:?} is not a topic to produce to: \".\", \"..\" and names starting with \"__\" are Kafka's own"
        ));
    }
    Ok(())
}

/// What a `kafka://` URL says.
struct Address {
    brokers: String,
    tls: bool,
    credentials: Option<(String, String)>,
}

/// The brokers and credentials of a `kafka://` URL (several brokers separated by commas:
/// `kafka://user:password@host1:9092,host2:9092`), or why it is none. Never quotes the URL: it
/// may hold a password.
fn parse_url(text: &str) -> Result<Address, ConfigError> {
    let expected = "expected kafka[+ssl]://[user:password@]host[:port][,host[:port]...]";
    let Some((scheme, rest)) = text.trim().split_once("://") else {
        return Err(ConfigError::invalid(
            "url",
            format!("not a URL; {expected}"),
        ));
    };
    let tls = match scheme {
        "kafka" => false,
        "kafka+ssl" => true,
        other => {
            return Err(ConfigError::invalid(
                "url",
                format!("a {other}:// URL; {expected}"),
            ))
        }
    };
    // The user information ends at the last `@` (a password may hold `@`).
    let (userinfo, hosts) = match rest.rsplit_once('@') {
        Some((userinfo, hosts)) => (Some(userinfo), hosts),
        None => (None, rest),
    };
    let hosts = hosts.trim_end_matches('/');
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .map(|text| text.into_owned())
            .map_err(|_| {
                ConfigError::invalid("url", "a user or password that is not UTF-8 once decoded")
            })
    };
    let credentials = match userinfo.map(|u| u.split_once(':')) {
        None => None,
        Some(Some((user, password))) if !user.is_empty() && !password.is_empty() => {
            Some((decode(user)?, decode(password)?))
        }
        // SASL logs in with both: a refused login would be an outage forever.
        Some(_) => {
            return Err(ConfigError::invalid(
                "url",
                format!("a user needs a password, and a password a user; {expected}"),
            ))
        }
    };
    let mut brokers = Vec::new();
    for host in hosts.split(',').map(str::trim) {
        let url = url::Url::parse(&format!("kafka://{host}"))
            .ok()
            .filter(|u| u.path().is_empty() && u.query().is_none() && u.fragment().is_none())
            .ok_or_else(|| {
                ConfigError::invalid(
                    "url",
                    format!("a broker that is not host[:port]; {expected}"),
                )
            })?;
        let Some(name) = url.host_str() else {
            return Err(ConfigError::invalid(
                "url",
                format!("a broker with no host; {expected}"),
            ));
        };
        brokers.push(format!("{name}:{}", url.port().unwrap_or(9092)));
    }
    Ok(Address {
        brokers: brokers.join(","),
        tls,
        credentials,
    })
}

impl Config for KafkaConfig {
    const OPTIONS: &'static [&'static str] = &[
        "url",
        "stream",
        "stream_prefix",
        "message_mode",
        "network_timeout",
        "client_id",
        "sasl_mechanism",
        "tls_ca_file",
        "tls_cert_file",
        "tls_key_file",
    ];
    const SECRETS: &'static [&'static str] = &["url"];
    const SUPERUSER_OPTIONS: &'static [&'static str] =
        &["tls_ca_file", "tls_cert_file", "tls_key_file"];

    fn from_options(options: &Options) -> Result<Self, ConfigError> {
        let Address {
            brokers,
            tls,
            credentials,
        } = parse_url(&options.text("url", "kafka://127.0.0.1:9092"))?;
        let context = &options.context;
        let (default_topic, default_id) = match &context.server {
            Some(server) => (
                format!("broadcaster.{server}"),
                format!(
                    "broadcaster-{:x}-{}-{server}",
                    context.cluster, context.database
                ),
            ),
            None => (
                "broadcaster.events".to_string(),
                format!("broadcaster-{:x}-{}", context.cluster, context.database),
            ),
        };
        let config = KafkaConfig {
            brokers,
            tls,
            credentials,
            sasl_mechanism: options.text("sasl_mechanism", "SCRAM-SHA-512"),
            topic: options.text("stream", &default_topic),
            stream_prefix: options.text("stream_prefix", ""),
            mode: options.message_mode()?,
            timeout: options.timeout("network_timeout")?,
            client_id: options.text("client_id", &default_id),
            tls_ca_file: options.text("tls_ca_file", ""),
            tls_cert_file: options.text("tls_cert_file", ""),
            tls_key_file: options.text("tls_key_file", ""),
        };
        if !matches!(
            config.sasl_mechanism.as_str(),
            "SCRAM-SHA-512" | "SCRAM-SHA-256" | "PLAIN"
        ) {
            return Err(ConfigError::invalid(
                "sasl_mechanism",
                format!(
                    "{:?}; expected SCRAM-SHA-512, SCRAM-SHA-256 or PLAIN",
                    config.sasl_mechanism
                ),
            ));
        }
        if config.client_id.is_empty() || config.client_id.contains('\0') {
            return Err(ConfigError::invalid(
                "client_id",
                "must not be empty or hold a NUL",
            ));
        }
        super::check_tls_files(
            &config.tls_ca_file,
            &config.tls_cert_file,
            &config.tls_key_file,
            (!config.tls).then_some("kafka+ssl://"),
        )?;
        check_topic(&config.topic).map_err(|why| {
            ConfigError::invalid(
                "stream",
                format!("{why} (the default is broadcaster.<server>: set stream when the server's name makes no topic)"),
            )
        })?;
        crate::event::validate_stream(&config.topic, &config.stream_prefix)
            .map_err(|e| ConfigError::invalid("stream", e.to_string()))?;
        Ok(config)
    }
}

/// What librdkafka reports to the relay's thread while it polls: each record's delivery, and
/// the client's last error (a broker unreachable, a login refused) for outage messages.
#[derive(Default)]
struct Reports {
    /// `(record number, None when written or the error)`, in arrival order.
    deliveries: Mutex<Vec<(usize, Option<RDKafkaErrorCode>)>>,
    last_error: Mutex<Option<String>>,
    /// librdkafka said every broker connection is down (a refused or failed connection, a
    /// refused login): a batch waiting then gives up at once instead of waiting for each
    /// record's timeout.
    all_down: AtomicBool,
}

impl ClientContext for Reports {
    /// librdkafka's own log lines stay out of the server log: they name brokers, never
    /// passwords, but would repeat every outage many times a second.
    fn log(&self, _level: RDKafkaLogLevel, _fac: &str, _log_message: &str) {}

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.all_down.store(true, Ordering::Relaxed);
        }
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(format!("{error}: {reason}"));
        }
    }
}

impl ProducerContext for Reports {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, record: usize) {
        let error = match result {
            Ok(_) => None,
            Err((e, _)) => Some(e.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Fail)),
        };
        if let Ok(mut deliveries) = self.deliveries.lock() {
            deliveries.push((record, error));
        }
    }
}

pub struct KafkaBackend {
    config: KafkaConfig,
    /// The client: its threads (one per broker, started with the relay's signals held, as the
    /// relay builds backends and calls them) never call Postgres; its callbacks run in
    /// [`BaseProducer::poll`], on the relay's thread. None after a fatal error, until the next
    /// batch builds it again.
    producer: Option<BaseProducer<Reports>>,
    /// The number the next record is handed to the client with: reports of records given up
    /// on in an earlier batch are told apart by it.
    next_record: usize,
    /// The last batch met `UNKNOWN_SERVER_ERROR` and dropped its client (see [`classify`]).
    after_unknown: bool,
}

impl Backend for KafkaBackend {
    type Config = KafkaConfig;

    fn new(config: KafkaConfig) -> Result<Self, BatchError> {
        let mut backend = KafkaBackend {
            config,
            producer: None,
            next_record: 0,
            after_unknown: false,
        };
        backend.producer()?;
        Ok(backend)
    }
}

impl Drop for KafkaBackend {
    fn drop(&mut self) {
        // Destroying the client waits for what it still holds: nothing, once purged.
        if let Some(producer) = &self.producer {
            producer.purge(PurgeConfig::default().queue().inflight());
            producer.poll(Duration::ZERO);
        }
    }
}

/// Whether `code` says the broker lost or refuses the producer's identity (id, epoch, sequence)
/// or failed on its own: the idempotent producer cannot go on, and a new client (a new
/// producer id) is the remedy Kafka's clients document. A broker that lost its producer state
/// (a restart on storage that does not keep it) answers so, and tansu 0.6.0 answers
/// `UNKNOWN_SERVER_ERROR` to a record of a producer epoch it did not hand out.
fn lost_producer(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as E;
    matches!(
        code,
        E::UnknownProducerId
            | E::InvalidProducerEpoch
            | E::OutOfOrderSequenceNumber
            | E::InvalidProducerIdMapping
            | E::ProducerFenced
            | E::Unknown
    )
}

/// Whether, after a report of `code`, the client is dropped and the next batch goes through a
/// new one (a new producer id): when the producer cannot go on ([`lost_producer`]), and when a
/// record timed out. After a timeout librdkafka would bump the producer's epoch itself
/// (KIP-360), which not every broker serves (tansu 0.6.0 stops serving anything); a new
/// client resends the batch the same way, in a producer session of its own, and costs one
/// connection per outage.
fn starts_afresh(code: RDKafkaErrorCode) -> bool {
    code == RDKafkaErrorCode::MessageTimedOut || lost_producer(code)
}

/// What a delivery error means for its record. `fresh`: the client was built for this batch
/// after the last one met `UNKNOWN_SERVER_ERROR`; met again, it is the record's (the Java client
/// does not retry it either), lest a record the broker cannot take be resent forever.
fn classify(code: RDKafkaErrorCode, topic: &str, fresh: bool) -> Outcome {
    use RDKafkaErrorCode as E;
    let said = format!("the broker refused the record for topic {topic:?}: {code}");
    match code {
        // The record's own: too large, invalid, its topic missing, refused or not writable.
        // Not InvalidTimestamp (the record's time is when it was produced: the relay's clock,
        // not the event), nor MessageBatchTooLarge (a batch librdkafka made of several events).
        E::MessageSizeTooLarge
        | E::InvalidMessageSize
        | E::InvalidMessage
        | E::InvalidRecord
        | E::InvalidTopic
        | E::UnknownTopic
        | E::UnknownTopicOrPartition
        | E::UnknownPartition
        | E::TopicAuthorizationFailed
        | E::PolicyViolation => Outcome::Rejected(said),
        E::MessageTimedOut => {
            Outcome::Deferred(format!("no delivery report for topic {topic:?} in time"))
        }
        E::Unknown if fresh => Outcome::Rejected(format!("{said}, again on a new client")),
        code if lost_producer(code) => Outcome::Deferred(format!(
            "{said}; the broker no longer knows the producer, whose client is built again"
        )),
        _ => Outcome::Deferred(said),
    }
}

impl KafkaBackend {
    fn broker(&self) -> String {
        let scheme = if self.config.tls {
            "kafka+ssl"
        } else {
            "kafka"
        };
        format!("{scheme}://{}", self.config.brokers)
    }

    fn unavailable(&self, why: impl std::fmt::Display) -> BatchError {
        BatchError::Unavailable(format!("{}: {why}", self.broker()))
    }

    /// The client's settings: librdkafka's names (CONFIGURATION.md of librdkafka 2.12), each
    /// value within the range librdkafka takes whatever `network_timeout` is.
    fn client_config(&self) -> ClientConfig {
        let config = &self.config;
        let timeout = config.timeout.as_millis();
        // Above linger.ms; request.timeout.ms at most 900,000; the connection's at least 1,000;
        // the wait for a missing topic's metadata at most 3,600,000.
        let ms = record_timeout(config.timeout)
            .as_millis()
            .clamp(10, 2_147_483_647)
            .to_string();
        let request = timeout.clamp(10, 900_000).to_string();
        let connect = timeout.clamp(1000, 2_147_483_647).to_string();
        let half = (timeout / 2).clamp(1, 3_600_000).to_string();
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &config.brokers)
            .set("client.id", &config.client_id)
            // acks=all, at most 5 requests in flight per partition, retries in order, and the
            // broker drops a retry it already wrote.
            .set("enable.idempotence", "true")
            // Keys to partitions as the Java client maps them.
            .set("partitioner", "murmur2_random")
            .set("message.timeout.ms", &ms)
            .set("request.timeout.ms", &request)
            .set("socket.connection.setup.timeout.ms", &connect)
            // A topic that does not exist fails its records (the event's fault) within half the
            // timeout, not 30 s, and so before they would time out (an outage).
            .set("topic.metadata.propagation.max.ms", &half)
            // A batch is handed over whole before the reports are awaited: no need to linger.
            .set("linger.ms", "1");
        let protocol = match (config.tls, config.credentials.is_some()) {
            (false, false) => "plaintext",
            (true, false) => "ssl",
            (false, true) => "sasl_plaintext",
            (true, true) => "sasl_ssl",
        };
        client.set("security.protocol", protocol);
        if let Some((user, password)) = &config.credentials {
            client
                .set("sasl.mechanisms", &config.sasl_mechanism)
                .set("sasl.username", user)
                .set("sasl.password", password);
        }
        if !config.tls_ca_file.is_empty() {
            client.set("ssl.ca.location", &config.tls_ca_file);
        }
        if !config.tls_cert_file.is_empty() {
            client
                .set("ssl.certificate.location", &config.tls_cert_file)
                .set("ssl.key.location", &config.tls_key_file);
        }
        client
    }

    /// The client, built first if there is none (after a fatal error).
    fn producer(&mut self) -> Result<&BaseProducer<Reports>, BatchError> {
        if self.producer.is_none() {
            let producer = self
                .client_config()
                .create_with_context(Reports::default())
                .map_err(|e| match e {
                    // A setting librdkafka refused: named, its value never shown (a password).
                    KafkaError::ClientConfig(_, _, key, _) => BatchError::Misconfigured(format!(
                        "the Kafka client refused its setting {key:?}"
                    )),
                    // librdkafka's word on its settings together, or a file it could not read.
                    KafkaError::ClientCreation(why) => BatchError::Misconfigured(format!(
                        "the Kafka client refused its settings: {why}"
                    )),
                    other => self.unavailable(other),
                })?;
            self.producer = Some(producer);
        }
        self.producer
            .as_ref()
            .ok_or_else(|| BatchError::Unavailable("no Kafka client".into()))
    }

    /// The client's fatal error, if it had one: it then produces nothing more (an idempotent
    /// producer whose sequence the broker no longer accepts). The next batch builds another.
    fn fatal(&mut self) -> Option<String> {
        let (code, why) = self.producer.as_ref()?.client().fatal_error()?;
        self.producer = None;
        Some(format!(
            "the Kafka client stopped ({code}: {why}); it is built again"
        ))
    }

    /// Forgets the client's last error: what it says next is about what comes next.
    fn forget_last_error(&self) {
        if let Some(producer) = &self.producer {
            producer.context().all_down.store(false, Ordering::Relaxed);
            if let Ok(mut last) = producer.context().last_error.lock() {
                *last = None;
            }
        }
    }

    /// The client's last error, for an outage's message.
    fn last_error(&self) -> Option<String> {
        let producer = self.producer.as_ref()?;
        producer.context().last_error.lock().ok()?.clone()
    }

    /// `event` as its topic, key, headers and value, or why it makes no record.
    fn record_parts(&self, event: &OutboxEvent) -> Result<Parts, String> {
        let topic = event.stream.as_deref().unwrap_or(&self.config.topic);
        check_topic(topic)?;
        crate::event::validate_stream(topic, &self.config.stream_prefix)
            .map_err(|e| e.to_string())?;
        let mut headers = OwnedHeaders::new();
        let value = match self.config.mode {
            Mode::Binary => {
                for (name, value) in binding::attributes(event, "ce_", binding::Values::Plain)? {
                    headers = headers.insert(Header {
                        key: &name,
                        value: Some(value.as_bytes()),
                    });
                }
                headers = headers.insert(Header {
                    key: "content-type",
                    value: Some(event.datacontenttype.as_bytes()),
                });
                event
                    .data_bytes()
                    .map_err(|e| e.to_string())?
                    .map(|d| d.into_owned())
            }
            Mode::Structured => {
                headers = headers.insert(Header {
                    key: "content-type",
                    value: Some(STRUCTURED.as_bytes()),
                });
                Some(event.structured_json().map_err(|e| e.to_string())?)
            }
        };
        Ok(Parts {
            topic: topic.to_string(),
            headers,
            value,
        })
    }
}

/// A record's parts, ready to hand to the client.
struct Parts {
    topic: String,
    headers: OwnedHeaders,
    value: Option<Vec<u8>>,
}

impl PublisherBackend for KafkaBackend {
    fn name(&self) -> &'static str {
        "kafka"
    }

    fn publish(&mut self, events: &[OutboxEvent]) -> Result<Vec<Outcome>, BatchError> {
        if let Some(why) = self.fatal() {
            return Err(self.unavailable(why));
        }
        self.forget_last_error();
        let parts: Vec<Result<Parts, String>> =
            events.iter().map(|e| self.record_parts(e)).collect();
        let timeout = self.config.timeout;
        let fresh = self.after_unknown;
        let first = self.next_record;
        self.next_record = self.next_record.wrapping_add(events.len());
        let producer = self.producer()?;
        let mut outcomes: Vec<Option<Outcome>> = vec![None; events.len()];
        let mut topics: Vec<String> = vec![String::new(); events.len()];
        let mut waiting = 0;
        // A report said the client should start afresh ([`starts_afresh`]).
        let mut rebuild = false;
        // A report was UNKNOWN_SERVER_ERROR.
        let mut unknown = false;
        // librdkafka times each record out itself (message.timeout.ms); this bounds the wait
        // for its reports a second beyond that, and for room in its queue.
        let deadline = Instant::now() + record_timeout(timeout) + Duration::from_secs(1);
        for (i, (event, parts)) in events.iter().zip(parts).enumerate() {
            let parts = match parts {
                Ok(parts) => parts,
                Err(why) => {
                    outcomes[i] = Some(Outcome::Rejected(why));
                    continue;
                }
            };
            let mut record = BaseRecord::with_opaque_to(&parts.topic, first.wrapping_add(i))
                .headers(parts.headers);
            if let Some(value) = &parts.value {
                record = record.payload(value);
            }
            if let Some(key) = &event.partition_key {
                record = record.key(key.as_bytes());
            }
            loop {
                match producer.send(record) {
                    Ok(()) => {
                        waiting += 1;
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                        if Instant::now() < deadline =>
                    {
                        producer.poll(POLL);
                        record = back;
                    }
                    Err((e, _)) => {
                        let code = e.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Fail);
                        rebuild |= starts_afresh(code);
                        unknown |= code == RDKafkaErrorCode::Unknown;
                        outcomes[i] = Some(classify(code, &parts.topic, fresh));
                        break;
                    }
                }
            }
            topics[i] = parts.topic;
        }
        while waiting > 0 && Instant::now() < deadline {
            producer.poll(POLL);
            let reports = match producer.context().deliveries.lock() {
                Ok(mut deliveries) => std::mem::take(&mut *deliveries),
                Err(_) => break,
            };
            for (record, error) in reports {
                let i = record.wrapping_sub(first);
                // A report of an earlier batch's record, given up on then.
                if i >= events.len() || outcomes[i].is_some() {
                    continue;
                }
                rebuild |= error.is_some_and(starts_afresh);
                unknown |= error == Some(RDKafkaErrorCode::Unknown);
                waiting -= 1;
                outcomes[i] = Some(match error {
                    None => Outcome::Delivered,
                    Some(code) => classify(code, &topics[i], fresh),
                });
            }
            // No broker to wait for: what is unacknowledged goes again with a new client.
            if waiting > 0 && producer.context().all_down.load(Ordering::Relaxed) {
                break;
            }
        }
        // The client's last error (a broker unreachable, a login refused), before it may go.
        let last_error = producer
            .context()
            .last_error
            .lock()
            .ok()
            .and_then(|last| last.clone());
        // Whatever the client still holds goes again with a new client's next batch: purged
        // records leave a gap in the idempotent producer's sequence, which the broker would
        // refuse (and librdkafka answer with an epoch bump).
        if rebuild || waiting > 0 {
            producer.purge(PurgeConfig::default().queue().inflight());
            producer.poll(Duration::ZERO);
            self.producer = None;
        }
        self.after_unknown = unknown && self.producer.is_none();
        let lost = self
            .fatal()
            .or_else(|| last_error.clone())
            .unwrap_or_else(|| "no delivery report in time".into());
        let outcomes: Vec<Outcome> = outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Outcome::Deferred(lost.clone())))
            .collect();
        // Nothing went through, and not for any event's fault: an outage, told by the client's
        // own word on it when it has one.
        if !outcomes.is_empty() && outcomes.iter().all(|o| matches!(o, Outcome::Deferred(_))) {
            let why = match (&outcomes[0], last_error) {
                (Outcome::Deferred(why), Some(last)) if why.starts_with("no delivery report") => {
                    format!("{why} ({last})")
                }
                (Outcome::Deferred(why), _) => why.clone(),
                _ => lost,
            };
            return Err(self.unavailable(why));
        }
        Ok(outcomes)
    }

    /// The default topic's metadata, within the timeout: a broker answers.
    fn health_check(&mut self) -> Result<(), BatchError> {
        if let Some(why) = self.fatal() {
            return Err(self.unavailable(why));
        }
        self.forget_last_error();
        let timeout = self.config.timeout;
        let topic = self.config.topic.clone();
        let producer = self.producer()?;
        producer.poll(Duration::ZERO);
        match producer.client().fetch_metadata(Some(&topic), timeout) {
            Ok(_) => Ok(()),
            Err(e) => {
                let why = self.last_error().unwrap_or_else(|| e.to_string());
                Err(self.unavailable(why))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> Result<KafkaConfig, ConfigError> {
        KafkaConfig::from_options(&crate::backend::test_options(Some("orders"), pairs))
    }

    #[test]
    fn urls_name_brokers_and_credentials_without_showing_the_password() {
        let c =
            config(&[("url", "kafka+ssl://relay:p%40ss@b1,b2:9093,[::1]:9094")]).expect("valid");
        assert_eq!(c.brokers, "b1:9092,b2:9093,[::1]:9094");
        assert!(c.tls);
        assert_eq!(
            c.credentials,
            Some(("relay".to_string(), "p@ss".to_string()))
        );
        assert_eq!(c.topic, "broadcaster.orders");
        assert_eq!(c.client_id, "broadcaster-74410b2c-db-orders");
        assert_eq!(c.sasl_mechanism, "SCRAM-SHA-512");
        let plain = config(&[]).expect("defaults");
        assert_eq!(
            (plain.brokers.as_str(), plain.tls),
            ("127.0.0.1:9092", false)
        );
        for bad in [
            "http://u:s3cret@h",
            "kafka://u:s3cret@h:notaport",
            "kafka://u:s3cret@h/path",
            "kafka://u:s3cret@",
            "kafka://u:s3cret@h#x",
            "kafka://:s3cret@h",
            "kafka://u:s3cret%FF@h",
        ] {
            let err = config(&[("url", bad)]).expect_err(bad);
            assert!(!err.to_string().contains("s3cret"), "{err}");
            assert!(err.to_string().contains("\"url\""), "{err}");
        }
        // A user with no password: SASL would be refused forever.
        assert!(config(&[("url", "kafka://relay@h")]).is_err());
    }

    #[test]
    fn options_say_which_is_wrong() {
        let named = |pairs: &[(&str, &str)], option: &str| {
            let err = config(pairs).expect_err("refused").to_string();
            assert!(err.contains(&format!("\"{option}\"")), "{err}");
        };
        named(&[("stream", "orders/eu")], "stream");
        named(&[("stream", "__consumer_offsets")], "stream");
        named(&[("stream", "..")], "stream");
        named(&[("stream", &"x".repeat(250))], "stream");
        named(&[("sasl_mechanism", "GSSAPI")], "sasl_mechanism");
        named(&[("message_mode", "batched")], "message_mode");
        named(&[("tls_ca_file", "/ca.pem")], "url");
        named(
            &[("url", "kafka+ssl://h"), ("tls_cert_file", "/c.pem")],
            "tls_cert_file",
        );
        assert!(check_topic("orders.eu-1_v2").is_ok());
    }

    #[test]
    fn a_record_waits_for_a_new_clients_start_at_least() {
        let ms = |ms: u64| record_timeout(Duration::from_millis(ms)).as_millis();
        assert_eq!(ms(10), 2000);
        assert_eq!(ms(1000), 2000);
        assert_eq!(ms(2000), 4000);
        assert_eq!(ms(30_000), 60_000);
    }

    #[test]
    fn delivery_errors_are_the_records_fault_or_an_outage() {
        use RDKafkaErrorCode as E;
        for code in [
            E::MessageSizeTooLarge,
            E::UnknownTopicOrPartition,
            E::TopicAuthorizationFailed,
        ] {
            assert!(
                matches!(classify(code, "t", false), Outcome::Rejected(_)),
                "{code:?}"
            );
        }
        for code in [
            E::MessageTimedOut,
            E::AllBrokersDown,
            E::NotEnoughReplicas,
            E::LeaderNotAvailable,
            E::InvalidTimestamp,
            E::MessageBatchTooLarge,
            E::Unknown,
        ] {
            assert!(
                matches!(classify(code, "t", false), Outcome::Deferred(_)),
                "{code:?}"
            );
        }
        // UNKNOWN_SERVER_ERROR again on a client built after the last one: the record's.
        assert!(matches!(
            classify(E::Unknown, "t", true),
            Outcome::Rejected(why) if why.contains("again on a new client")
        ));
    }
}
