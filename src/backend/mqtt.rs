//! MQTT 5 backend: each event published at QoS 1 and counted delivered once the broker's
//! `PUBACK` says so, in the CloudEvents MQTT binding (binary mode: attributes as user
//! properties, the data's content type as the message's; or structured mode). A batch's
//! publishes go out within the broker's in-flight window before their acknowledgements are
//! awaited.
//!
//! ```sql
//! CREATE SERVER devices FOREIGN DATA WRAPPER broadcaster
//!   OPTIONS (backend 'mqtt', url 'mqtt://broker:1883', stream 'devices/events');
//! ```
//!
//! Where an event goes: its `stream` (or the server's `stream` option) is the topic. A `PUBACK`
//! refusing the message (not authorized, topic or payload invalid), or a message over the
//! broker's maximum packet size, is the event's fault; no connection, no `PUBACK` within
//! `network_timeout`, or the broker's quota exceeded is an outage. MQTT has no de-duplication:
//! a resend after a lost `PUBACK` is a second message, with the same `id` user property.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::Outgoing;
use tokio::sync::mpsc;
use url::Url;

use super::binding::Mode;
use super::{
    binding, Backend, BatchError, Config, ConfigError, Options, Outcome, PublisherBackend, TlsFiles,
};
use crate::event::OutboxEvent;

/// `CREATE SERVER ... OPTIONS (backend 'mqtt', url '...', ...)`.
#[derive(Clone)]
pub struct MqttConfig {
    /// From `url`: `mqtt://[user:password@]host[:port]` (1883) or `mqtts://` (8883). Secret: a
    /// URL with a password belongs in a `USER MAPPING`.
    pub host: String,
    pub port: u16,
    pub tls: bool,
    pub credentials: Option<(String, String)>,
    /// `stream`: the topic of events whose `stream` column is NULL. Default
    /// `broadcaster/<server>`.
    pub topic: String,
    /// `stream_prefix`: every topic an event names must start with this; empty: any.
    pub stream_prefix: String,
    /// `message_mode`: `binary` (the default: attributes as user properties named as the
    /// attributes, the content type property the data's, the data as the payload) or
    /// `structured`.
    pub mode: Mode,
    /// `network_timeout` (milliseconds): bound on connecting and on each batch's `PUBACK`s.
    pub timeout: Duration,
    /// `client_id`: default `broadcaster-<system identifier, hex>-<database>-<server>`.
    pub client_id: String,
    /// `tls_ca_file`: CA certificates (PEM) to trust instead of the system's.
    pub tls_ca_file: String,
    /// `tls_cert_file`, `tls_key_file`: client certificate and key (PEM, PKCS #8) for mutual TLS.
    pub tls_cert_file: String,
    pub tls_key_file: String,
}

impl std::fmt::Debug for MqttConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("topic", &self.topic)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

/// Whether `topic` is one a message can be published to (MQTT 5, 4.7): not empty, no wildcard
/// (`+`, `#`), no NUL, at most 65,535 bytes; and not a `$` topic, which brokers keep for
/// themselves.
pub fn check_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() || topic.len() > 65535 {
        return Err(format!("a topic of {} bytes; 1 to 65535", topic.len()));
    }
    if topic.contains(['+', '#', '\0']) || topic.starts_with('$') {
        return Err(format!(
            "{topic:?} is not an MQTT topic to publish to: no wildcard (+ or #), no NUL, not starting with $"
        ));
    }
    Ok(())
}

impl Config for MqttConfig {
    const OPTIONS: &'static [&'static str] = &[
        "url",
        "stream",
        "stream_prefix",
        "message_mode",
        "network_timeout",
        "client_id",
        "tls_ca_file",
        "tls_cert_file",
        "tls_key_file",
    ];
    const SECRETS: &'static [&'static str] = &["url"];
    const SUPERUSER_OPTIONS: &'static [&'static str] =
        &["tls_ca_file", "tls_cert_file", "tls_key_file"];

    fn from_options(options: &Options) -> Result<Self, ConfigError> {
        let text = options.text("url", "mqtt://127.0.0.1:1883");
        // Never quoted: it may hold a password.
        let url = Url::parse(&text).map_err(|e| {
            ConfigError::invalid(
                "url",
                format!("not a valid URL ({e}); expected mqtt[s]://[user:password@]host[:port]"),
            )
        })?;
        let tls = match url.scheme() {
            "mqtt" | "tcp" => false,
            "mqtts" | "ssl" => true,
            other => {
                return Err(ConfigError::invalid(
                    "url",
                    format!("a {other}:// URL; expected mqtt:// or mqtts://"),
                ))
            }
        };
        let Some(host) = url.host_str() else {
            return Err(ConfigError::invalid("url", "no host"));
        };
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        let credentials = (!url.username().is_empty()).then(|| {
            (
                decode(url.username()),
                decode(url.password().unwrap_or_default()),
            )
        });
        let context = &options.context;
        // The cluster's identifier in the client id: a broker drops a connection when another
        // takes its client id, so two clusters' relays of same-named databases and servers
        // would keep knocking each other off.
        let (default_topic, default_id) = match &context.server {
            Some(server) => (
                format!("broadcaster/{server}"),
                format!(
                    "broadcaster-{:x}-{}-{server}",
                    context.cluster, context.database
                ),
            ),
            None => (
                "broadcaster/events".to_string(),
                format!("broadcaster-{:x}-{}", context.cluster, context.database),
            ),
        };
        let config = MqttConfig {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port: url.port().unwrap_or(if tls { 8883 } else { 1883 }),
            tls,
            credentials,
            topic: options.text("stream", &default_topic),
            stream_prefix: options.text("stream_prefix", ""),
            mode: options.message_mode()?,
            timeout: options.timeout("network_timeout")?,
            client_id: options.text("client_id", &default_id),
            tls_ca_file: options.text("tls_ca_file", ""),
            tls_cert_file: options.text("tls_cert_file", ""),
            tls_key_file: options.text("tls_key_file", ""),
        };
        if config.client_id.is_empty() || config.client_id.len() > 65535 {
            return Err(ConfigError::invalid("client_id", "1 to 65535 bytes"));
        }
        super::check_tls_files(
            &config.tls_ca_file,
            &config.tls_cert_file,
            &config.tls_key_file,
            (!config.tls).then_some("mqtts://"),
        )?;
        check_topic(&config.topic).map_err(|why| ConfigError::invalid("stream", why))?;
        crate::event::validate_stream(&config.topic, &config.stream_prefix)
            .map_err(|e| ConfigError::invalid("stream", e.to_string()))?;
        Ok(config)
    }
}

/// What the task polling the connection tells the backend.
enum Note {
    /// Connected (`CONNACK` accepted).
    Up,
    /// A publish went out with this packet id.
    Sent(u16),
    /// The broker's `PUBACK` of a packet id: its reason, and the reason string if any.
    Acked(u16, PubAckReason, Option<String>),
    /// The connection failed or was lost.
    Down(String),
}

/// A connection: the client to publish through, and what its polling task notes.
struct Session {
    client: AsyncClient,
    notes: mpsc::UnboundedReceiver<Note>,
    /// The broker's maximum packet size (`CONNACK`); 0 when it set none.
    max_packet: Arc<AtomicU32>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub struct MqttBackend {
    config: MqttConfig,
    /// Runs the connection's polling task between batches too (keep-alive pings): a thread of
    /// its own, started with the relay's signals held, that never calls Postgres.
    runtime: tokio::runtime::Runtime,
    session: Option<Session>,
}

impl Backend for MqttBackend {
    type Config = MqttConfig;

    fn new(config: MqttConfig) -> Result<Self, BatchError> {
        Ok(MqttBackend {
            config,
            runtime: super::runtime("mqtt")?,
            session: None,
        })
    }
}

/// A message ready to publish.
struct Message {
    topic: String,
    payload: Vec<u8>,
    properties: PublishProperties,
    /// Bytes it takes on the wire, near enough to compare with the broker's maximum.
    size: usize,
}

/// Polls `events` until the session is dropped, noting what the backend needs. After a failure
/// it waits a little: the next poll connects again.
async fn poll(mut events: EventLoop, notes: mpsc::UnboundedSender<Note>, max: Arc<AtomicU32>) {
    loop {
        let note = match events.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                let limit = ack.properties.and_then(|p| p.max_packet_size).unwrap_or(0);
                max.store(limit, Ordering::Relaxed);
                Some(Note::Up)
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => Some(Note::Sent(pkid)),
            Ok(Event::Incoming(Packet::PubAck(ack))) => Some(Note::Acked(
                ack.pkid,
                ack.reason,
                ack.properties.and_then(|p| p.reason_string),
            )),
            Ok(_) => None,
            Err(e) => {
                let down = notes.send(Note::Down(e.to_string()));
                if down.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        if let Some(note) = note {
            if notes.send(note).is_err() {
                return;
            }
        }
    }
}

impl MqttBackend {
    fn broker(&self) -> String {
        let scheme = if self.config.tls { "mqtts" } else { "mqtt" };
        format!("{scheme}://{}:{}", self.config.host, self.config.port)
    }

    fn unavailable(&self, why: impl std::fmt::Display) -> BatchError {
        BatchError::Unavailable(format!("{}: {why}", self.broker()))
    }

    fn options(&self) -> Result<MqttOptions, BatchError> {
        let config = &self.config;
        let mut options = MqttOptions::new(&config.client_id, &config.host, config.port);
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_clean_start(true)
            .set_connection_timeout(config.timeout.as_secs().max(1))
            .set_outgoing_inflight_upper_limit(1000);
        if let Some((user, password)) = &config.credentials {
            options.set_credentials(user, password);
        }
        if config.tls {
            let files = TlsFiles::read(
                &config.tls_ca_file,
                &config.tls_cert_file,
                &config.tls_key_file,
            )?;
            let mut tls = native_tls::TlsConnector::builder();
            if let Some(pem) = files.ca {
                let ca = native_tls::Certificate::from_pem(&pem).map_err(|e| {
                    BatchError::Misconfigured(format!("option \"tls_ca_file\": {e}"))
                })?;
                tls.add_root_certificate(ca).disable_built_in_roots(true);
            }
            if let Some((cert, key)) = files.identity {
                let identity = native_tls::Identity::from_pkcs8(&cert, &key).map_err(|e| {
                    BatchError::Misconfigured(format!(
                        "options \"tls_cert_file\", \"tls_key_file\": {e}"
                    ))
                })?;
                tls.identity(identity);
            }
            let connector = tls
                .build()
                .map_err(|e| BatchError::Misconfigured(format!("TLS: {e}")))?;
            options.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::NativeConnector(connector),
            ));
        }
        Ok(options)
    }

    /// Connects, unless connected: waits for the broker's `CONNACK` within the timeout.
    fn connect(&mut self) -> Result<(), BatchError> {
        if self.session.is_some() {
            return Ok(());
        }
        let options = self.options()?;
        let timeout = self.config.timeout;
        let connected = self.runtime.block_on(async move {
            let (client, events) = AsyncClient::new(options, 1024);
            let (tell, mut notes) = mpsc::unbounded_channel();
            let max_packet = Arc::new(AtomicU32::new(0));
            let task = tokio::spawn(poll(events, tell, Arc::clone(&max_packet)));
            let first = tokio::time::timeout(timeout * 2, notes.recv()).await;
            let session = Session {
                client,
                notes,
                max_packet,
                task,
            };
            match first {
                Ok(Some(Note::Up)) => Ok(session),
                Ok(Some(Note::Down(why))) => Err(why),
                Ok(_) => Err("the connection ended".to_string()),
                Err(_) => Err("no CONNACK in time".to_string()),
            }
        });
        match connected {
            Ok(session) => {
                self.session = Some(session);
                Ok(())
            }
            Err(why) => Err(self.unavailable(why)),
        }
    }

    /// `event` as a message, or why it makes none.
    fn message(&self, event: &OutboxEvent) -> Result<Message, String> {
        let topic = event.stream.as_deref().unwrap_or(&self.config.topic);
        check_topic(topic)?;
        crate::event::validate_stream(topic, &self.config.stream_prefix)
            .map_err(|e| e.to_string())?;
        let mut properties = PublishProperties::default();
        let payload = match self.config.mode {
            Mode::Binary => {
                properties.user_properties =
                    binding::attributes(event, "", binding::Values::Plain)?;
                properties.content_type = Some(event.datacontenttype.clone());
                event
                    .data_bytes()
                    .map_err(|e| e.to_string())?
                    .map(|d| d.into_owned())
                    .unwrap_or_default()
            }
            Mode::Structured => {
                properties.content_type = Some(binding::STRUCTURED_CONTENT_TYPE.to_string());
                event.structured_json().map_err(|e| e.to_string())?
            }
        };
        let size = topic.len()
            + payload.len()
            + properties
                .user_properties
                .iter()
                .map(|(k, v)| k.len() + v.len() + 5)
                .sum::<usize>()
            + properties.content_type.as_ref().map_or(0, String::len)
            + 16;
        Ok(Message {
            topic: topic.to_string(),
            payload,
            properties,
            size,
        })
    }
}

/// What a `PUBACK` reason means.
fn classify(reason: PubAckReason, text: Option<String>, topic: &str) -> Outcome {
    let said = || {
        let text = text.clone().map(|t| format!(": {t}")).unwrap_or_default();
        format!("the broker refused the message to {topic:?} ({reason:?}){text}")
    };
    match reason {
        // Accepted; no subscriber matched (MQTT keeps no message for later then).
        PubAckReason::Success | PubAckReason::NoMatchingSubscribers => Outcome::Delivered,
        // The broker's state or its failure, not the message's.
        PubAckReason::QuotaExceeded
        | PubAckReason::PacketIdentifierInUse
        | PubAckReason::UnspecifiedError
        | PubAckReason::ImplementationSpecificError => Outcome::Deferred(said()),
        // Not authorized, topic name or payload format invalid: this message's.
        _ => Outcome::Rejected(said()),
    }
}

impl PublisherBackend for MqttBackend {
    fn name(&self) -> &'static str {
        "mqtt"
    }

    fn publish(&mut self, events: &[OutboxEvent]) -> Result<Vec<Outcome>, BatchError> {
        self.connect()?;
        let messages: Vec<Result<Message, String>> =
            events.iter().map(|e| self.message(e)).collect();
        let timeout = self.config.timeout;
        let Some(session) = self.session.as_mut() else {
            return Err(self.unavailable("not connected"));
        };
        let max_packet = session.max_packet.load(Ordering::Relaxed) as usize;
        let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(messages.len());
        // The index and topic of each message sent, in order.
        let mut sent: Vec<(usize, String)> = Vec::new();
        let mut lost: Option<String> = None;
        let finished = self.runtime.block_on(async {
            // What the task noted since the last batch: a connection lost meanwhile.
            while let Ok(note) = session.notes.try_recv() {
                if let Note::Down(why) = note {
                    return Err(why);
                }
            }
            for (i, message) in messages.into_iter().enumerate() {
                let message = match message {
                    Ok(m) if max_packet > 0 && m.size > max_packet => {
                        outcomes.push(Some(Outcome::Rejected(format!(
                            "a message of about {} bytes; the broker takes at most {max_packet}",
                            m.size
                        ))));
                        continue;
                    }
                    Ok(m) => m,
                    Err(why) => {
                        outcomes.push(Some(Outcome::Rejected(why)));
                        continue;
                    }
                };
                outcomes.push(None);
                let topic = message.topic.clone();
                let queued = tokio::time::timeout(
                    timeout,
                    session.client.publish_with_properties(
                        message.topic,
                        QoS::AtLeastOnce,
                        false,
                        message.payload,
                        message.properties,
                    ),
                )
                .await;
                match queued {
                    Ok(Ok(())) => sent.push((i, topic)),
                    Ok(Err(e)) => outcomes[i] = Some(Outcome::Rejected(e.to_string())),
                    Err(_) => return Err("the client's queue stayed full".to_string()),
                }
            }
            // Packet ids come in the order the publishes were queued; PUBACKs in any order.
            let mut ids: Vec<(u16, usize)> = Vec::with_capacity(sent.len());
            // Index in `sent` of each packet id.
            let mut next = 0;
            let mut waiting = sent.len();
            // The timeout runs from the last sign of progress: a broker with a small receive
            // window acknowledges a large batch a window at a time.
            let mut deadline = Instant::now() + timeout;
            while waiting > 0 {
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, session.notes.recv()).await {
                    Ok(Some(Note::Sent(pkid))) if next < sent.len() => {
                        ids.push((pkid, next));
                        next += 1;
                    }
                    Ok(Some(Note::Acked(pkid, reason, text))) => {
                        let Some(at) = ids.iter().position(|(id, _)| *id == pkid) else {
                            continue;
                        };
                        deadline = Instant::now() + timeout;
                        let (_, n) = ids.swap_remove(at);
                        let (i, topic) = &sent[n];
                        outcomes[*i] = Some(classify(reason, text, topic));
                        waiting -= 1;
                    }
                    Ok(Some(Note::Down(why))) => return Err(why),
                    Ok(Some(_)) => {}
                    Ok(None) => return Err("the connection ended".to_string()),
                    Err(_) => return Err("no PUBACK in time".to_string()),
                }
            }
            Ok(())
        });
        if let Err(why) = finished {
            // What is unacknowledged may still arrive, or not: start afresh, and send it again.
            self.session = None;
            lost = Some(why);
        }
        let outcomes: Vec<Outcome> = outcomes
            .into_iter()
            .map(|o| {
                o.unwrap_or_else(|| {
                    Outcome::Deferred(lost.clone().unwrap_or_else(|| "not acknowledged".into()))
                })
            })
            .collect();
        if let Some(why) = lost {
            if !outcomes.contains(&Outcome::Delivered) {
                return Err(self.unavailable(why));
            }
        }
        Ok(outcomes)
    }

    /// Connected: the polling task has noted no loss since.
    fn health_check(&mut self) -> Result<(), BatchError> {
        self.connect()?;
        let down = self.session.as_mut().and_then(|s| {
            let mut down = None;
            while let Ok(note) = s.notes.try_recv() {
                match note {
                    Note::Down(why) => down = Some(why),
                    Note::Up => down = None,
                    _ => {}
                }
            }
            down
        });
        match down {
            None => Ok(()),
            Some(why) => {
                self.session = None;
                Err(self.unavailable(why))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> Result<MqttConfig, ConfigError> {
        MqttConfig::from_options(&crate::backend::test_options(Some("devices"), pairs))
    }

    #[test]
    fn options_say_what_is_wrong_without_the_password() {
        let c = config(&[("url", "mqtts://relay:p%40ss@broker")]).expect("valid");
        assert_eq!((c.host.as_str(), c.port, c.tls), ("broker", 8883, true));
        assert_eq!(
            c.credentials,
            Some(("relay".to_string(), "p@ss".to_string()))
        );
        assert_eq!(c.topic, "broadcaster/devices");
        assert_eq!(c.client_id, "broadcaster-74410b2c-db-devices");
        let err = config(&[("url", "http://u:s3cret@h")]).expect_err("refused");
        assert!(!err.to_string().contains("s3cret"), "{err}");
        assert!(config(&[("stream", "devices/+")]).is_err());
        assert!(config(&[("stream", "$SYS/x")]).is_err());
        assert!(
            config(&[("tls_ca_file", "/ca.pem")]).is_err(),
            "mqtt:// with a CA"
        );
        assert!(config(&[("message_mode", "batched")]).is_err());
    }

    #[test]
    fn pubacks_are_delivered_refused_or_an_outage() {
        assert_eq!(
            classify(PubAckReason::NoMatchingSubscribers, None, "t"),
            Outcome::Delivered
        );
        assert!(matches!(
            classify(PubAckReason::NotAuthorized, Some("acl".into()), "t"),
            Outcome::Rejected(why) if why.contains("NotAuthorized") && why.contains("acl")
        ));
        assert!(matches!(
            classify(PubAckReason::QuotaExceeded, None, "t"),
            Outcome::Deferred(_)
        ));
    }
}
