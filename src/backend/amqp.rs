//! AMQP 0-9-1 backend (RabbitMQ): each event published persistent and `mandatory`, counted
//! delivered once the broker confirms it (publisher confirms) and has not returned it as
//! unroutable. Attributes travel as the CloudEvents AMQP binding's application properties
//! (`cloudEvents_*` headers; binary mode) or the whole event as the body (structured mode);
//! `message_id` is the event's id. A batch's publishes all go out before their confirms are
//! awaited.
//!
//! ```sql
//! CREATE SERVER billing FOREIGN DATA WRAPPER broadcaster
//!   OPTIONS (backend 'amqp', url 'amqp://rabbit:5672/%2f', exchange 'events', stream 'billing');
//! ```
//!
//! Where an event goes: to the `exchange` option's exchange (the default exchange when unset),
//! with its `stream` (or the server's `stream` option) as the routing key. A message no queue
//! takes (returned `NO_ROUTE`), or one the broker refuses as malformed or too large, is the
//! event's fault; no connection, no confirm within `network_timeout`, or a `nack` is an outage;
//! an exchange that does not exist is a misconfiguration that names it.

use std::collections::HashSet;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};

use super::binding::Mode;
use super::{
    binding, Backend, BatchError, Config, ConfigError, Options, Outcome, PublisherBackend, TlsFiles,
};
use crate::event::OutboxEvent;

/// `CREATE SERVER ... OPTIONS (backend 'amqp', url '...', ...)`.
#[derive(Clone)]
pub struct AmqpConfig {
    /// `url`: `amqp://[user:password@]host[:port][/vhost]` or `amqps://`. Secret: a URL with a
    /// password belongs in a `USER MAPPING`.
    pub url: String,
    /// `exchange`: empty (the default) is the default exchange, which routes by queue name.
    pub exchange: String,
    /// `stream`: the routing key of events whose `stream` column is NULL. Default
    /// `broadcaster.<server>`.
    pub routing_key: String,
    /// `stream_prefix`: every routing key an event names must start with this; empty: any.
    pub stream_prefix: String,
    /// `message_mode`: `binary` (the default: attributes as `cloudEvents_*` application
    /// properties, the content type the data's, the data as the body) or `structured`.
    pub mode: Mode,
    /// `network_timeout` (milliseconds): bound on connecting and on each confirm.
    pub timeout: Duration,
    /// `tls_ca_file`: CA certificates (PEM) to trust for `amqps://`, instead of the system's.
    pub tls_ca_file: String,
    /// `tls_cert_file`, `tls_key_file`: client certificate and key (PEM, PKCS #8).
    pub tls_cert_file: String,
    pub tls_key_file: String,
}

impl std::fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("url", &"<hidden>")
            .field("exchange", &self.exchange)
            .field("routing_key", &self.routing_key)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

/// A routing key: at most 255 bytes (an AMQP short string).
pub fn check_routing_key(key: &str) -> Result<(), String> {
    if key.len() > 255 {
        return Err(format!(
            "a routing key of {} bytes; AMQP allows at most 255",
            key.len()
        ));
    }
    Ok(())
}

impl Config for AmqpConfig {
    const OPTIONS: &'static [&'static str] = &[
        "url",
        "exchange",
        "stream",
        "stream_prefix",
        "message_mode",
        "network_timeout",
        "tls_ca_file",
        "tls_cert_file",
        "tls_key_file",
    ];
    const SECRETS: &'static [&'static str] = &["url"];
    const SUPERUSER_OPTIONS: &'static [&'static str] =
        &["tls_ca_file", "tls_cert_file", "tls_key_file"];

    fn from_options(options: &Options) -> Result<Self, ConfigError> {
        let url = options.text("url", "amqp://127.0.0.1:5672/%2f");
        // Never quoted: it may hold a password.
        let parsed: lapin::uri::AMQPUri = url.parse().map_err(|_| {
            ConfigError::invalid(
                "url",
                "not a valid AMQP URL; expected amqp[s]://[user:password@]host[:port][/vhost]",
            )
        })?;
        let context = &options.context;
        let default_key = match &context.server {
            Some(server) => format!("broadcaster.{server}"),
            None => "broadcaster.events".to_string(),
        };
        let config = AmqpConfig {
            url,
            exchange: options.text("exchange", ""),
            routing_key: options.text("stream", &default_key),
            stream_prefix: options.text("stream_prefix", ""),
            mode: options.message_mode()?,
            timeout: options.timeout("network_timeout")?,
            tls_ca_file: options.text("tls_ca_file", ""),
            tls_cert_file: options.text("tls_cert_file", ""),
            tls_key_file: options.text("tls_key_file", ""),
        };
        if config.exchange.len() > 255 {
            return Err(ConfigError::invalid("exchange", "at most 255 bytes"));
        }
        super::check_tls_files(
            &config.tls_ca_file,
            &config.tls_cert_file,
            &config.tls_key_file,
            (parsed.scheme != lapin::uri::AMQPScheme::AMQPS).then_some("amqps://"),
        )?;
        check_routing_key(&config.routing_key)
            .map_err(|why| ConfigError::invalid("stream", why))?;
        crate::event::validate_stream(&config.routing_key, &config.stream_prefix)
            .map_err(|e| ConfigError::invalid("stream", e.to_string()))?;
        Ok(config)
    }
}

pub struct AmqpBackend {
    config: AmqpConfig,
    /// Runs the connection's heartbeats between batches too: a thread of its own, started
    /// with the relay's signals held, that never calls Postgres.
    runtime: tokio::runtime::Runtime,
    connection: Option<(Connection, Channel)>,
}

impl Backend for AmqpBackend {
    type Config = AmqpConfig;

    fn new(config: AmqpConfig) -> Result<Self, BatchError> {
        Ok(AmqpBackend {
            config,
            runtime: super::runtime("amqp")?,
            connection: None,
        })
    }
}

/// A message ready to publish.
#[derive(Clone)]
struct Message {
    routing_key: String,
    body: Vec<u8>,
    properties: BasicProperties,
}

/// What became of one publish, before returns are matched to events.
#[derive(Clone)]
enum Confirmed {
    Acked,
    Outcome(Outcome),
}

impl AmqpBackend {
    /// `scheme://host:port/vhost` of the URL, for messages (never the credentials).
    fn broker(&self) -> String {
        match self.config.url.parse::<lapin::uri::AMQPUri>() {
            Ok(uri) => format!(
                "{}://{}:{}/{}",
                if uri.scheme == lapin::uri::AMQPScheme::AMQPS {
                    "amqps"
                } else {
                    "amqp"
                },
                uri.authority.host,
                uri.authority.port,
                uri.vhost
            ),
            Err(_) => "the broker".into(),
        }
    }

    fn unavailable(&self, why: impl std::fmt::Display) -> BatchError {
        BatchError::Unavailable(format!("{}: {why}", self.broker()))
    }

    fn tls(&self) -> Result<lapin::tcp::OwnedTLSConfig, BatchError> {
        let config = &self.config;
        let files = TlsFiles::read(
            &config.tls_ca_file,
            &config.tls_cert_file,
            &config.tls_key_file,
        )?;
        let mut tls = lapin::tcp::OwnedTLSConfig::default();
        if let Some(pem) = files.ca {
            tls.cert_chain = Some(String::from_utf8_lossy(&pem).into_owned());
        }
        if let Some((pem, key)) = files.identity {
            tls.identity = Some(lapin::tcp::OwnedIdentity::PKCS8 { pem, key });
        }
        Ok(tls)
    }

    /// Connects and opens a confirming channel, unless that is done and still open.
    fn connect(&mut self) -> Result<Channel, BatchError> {
        if let Some((connection, channel)) = &self.connection {
            if connection.status().connected() && channel.status().connected() {
                return Ok(channel.clone());
            }
        }
        self.connection = None;
        let tls = self.tls()?;
        let (url, timeout) = (self.config.url.clone(), self.config.timeout);
        let connected = self.runtime.block_on(async move {
            let open = async {
                let runtime = lapin::runtime::default_runtime().map_err(|e| e.to_string())?;
                let connection = Connection::connect_with_config(
                    &url,
                    ConnectionProperties::default(),
                    tls,
                    runtime,
                )
                .await
                .map_err(|e| e.to_string())?;
                let channel = connection
                    .create_channel()
                    .await
                    .map_err(|e| e.to_string())?;
                channel
                    .confirm_select(ConfirmSelectOptions::default())
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>((connection, channel))
            };
            tokio::time::timeout(timeout * 2, open)
                .await
                .map_err(|_| "connecting timed out".to_string())?
        });
        let (connection, channel) = connected.map_err(|e| self.unavailable(e))?;
        self.connection = Some((connection, channel.clone()));
        Ok(channel)
    }

    /// `event` as a message, or why it makes none.
    fn message(&self, event: &OutboxEvent) -> Result<Message, String> {
        let routing_key = event.stream.as_deref().unwrap_or(&self.config.routing_key);
        check_routing_key(routing_key)?;
        crate::event::validate_stream(routing_key, &self.config.stream_prefix)
            .map_err(|e| e.to_string())?;
        let properties = BasicProperties::default()
            .with_message_id(ShortString::from(event.id.clone()))
            .with_delivery_mode(2);
        let (properties, body) = match self.config.mode {
            Mode::Binary => {
                let mut headers = FieldTable::default();
                for (name, value) in
                    binding::attributes(event, "cloudEvents_", binding::Values::Plain)?
                {
                    let name = ShortString::try_new(name)
                        .map_err(|_| "an attribute name over 255 bytes".to_string())?;
                    headers.insert(name, AMQPValue::LongString(LongString::from(value)));
                }
                let content_type = ShortString::try_new(event.datacontenttype.clone())
                    .map_err(|_| "a datacontenttype over 255 bytes".to_string())?;
                let body = event
                    .data_bytes()
                    .map_err(|e| e.to_string())?
                    .map(|d| d.into_owned())
                    .unwrap_or_default();
                (
                    properties
                        .with_content_type(content_type)
                        .with_headers(headers),
                    body,
                )
            }
            Mode::Structured => (
                properties.with_content_type(ShortString::from(binding::STRUCTURED_CONTENT_TYPE)),
                event.structured_json().map_err(|e| e.to_string())?,
            ),
        };
        Ok(Message {
            routing_key: routing_key.to_string(),
            body,
            properties,
        })
    }
}

/// How the rejection of a message the broker refused (406) starts.
const REFUSED: &str = "the broker refused the message";

/// Publishes `messages` on `channel`, all before their confirms are awaited: one deadline for
/// sending, one for the confirms, so that a frozen broker holds a batch for at most twice
/// `timeout`. Returns what became of each, and the `message_id`s returned unroutable (a return
/// may ride on another message's confirm).
async fn send_batch(
    channel: &Channel,
    exchange: &str,
    messages: Vec<Result<Message, String>>,
    timeout: Duration,
) -> Result<(Vec<Confirmed>, HashSet<String>), BatchError> {
    let send_by = tokio::time::Instant::now() + timeout;
    let mut away: Option<String> = None;
    let mut pending = Vec::with_capacity(messages.len());
    for message in messages {
        let message = match message {
            Ok(m) => m,
            Err(why) => {
                pending.push(Err(Confirmed::Outcome(Outcome::Rejected(why))));
                continue;
            }
        };
        if let Some(why) = &away {
            pending.push(Err(Confirmed::Outcome(Outcome::Deferred(why.clone()))));
            continue;
        }
        let sent = tokio::time::timeout_at(
            send_by,
            channel.basic_publish(
                ShortString::from(exchange.to_string()),
                ShortString::from(message.routing_key),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &message.body,
                message.properties,
            ),
        )
        .await;
        pending.push(match sent {
            Ok(Ok(confirm)) => Ok(confirm),
            Ok(Err(e)) => Err(Confirmed::Outcome(classify(&e, exchange)?)),
            Err(_) => {
                let why = "sending timed out".to_string();
                away = Some(why.clone());
                Err(Confirmed::Outcome(Outcome::Deferred(why)))
            }
        });
    }
    let confirm_by = tokio::time::Instant::now() + timeout;
    let mut returned: HashSet<String> = HashSet::new();
    let mut results = Vec::with_capacity(pending.len());
    for p in pending {
        let confirm = match p {
            Err(done) => {
                results.push(done);
                continue;
            }
            Ok(confirm) => confirm,
        };
        let mut note_return = |m: Option<lapin::message::BasicReturnMessage>| {
            if let Some(m) = m {
                returned.extend(m.properties.message_id().as_ref().map(|s| s.to_string()));
            }
        };
        let result = match tokio::time::timeout_at(confirm_by, confirm).await {
            Ok(Ok(Confirmation::Ack(message))) => {
                note_return(message);
                Confirmed::Acked
            }
            Ok(Ok(Confirmation::Nack(message))) => {
                note_return(message);
                Confirmed::Outcome(Outcome::Deferred(
                    "the broker could not take the message (nack)".into(),
                ))
            }
            Ok(Ok(Confirmation::NotRequested)) => Confirmed::Acked,
            Ok(Err(e)) => Confirmed::Outcome(classify(&e, exchange)?),
            Err(_) => Confirmed::Outcome(Outcome::Deferred("no confirm in time".into())),
        };
        results.push(result);
    }
    Ok((results, returned))
}

/// What an error from publishing or its confirm means: the broker refusing this message (a
/// channel closed with 406 PRECONDITION_FAILED, say: too large; or 403 ACCESS_REFUSED for its
/// routing key, by RabbitMQ's topic permissions), a missing exchange or no right to write to
/// it (a misconfiguration), or the connection gone.
fn classify(e: &lapin::Error, exchange: &str) -> Result<Outcome, BatchError> {
    if let lapin::ErrorKind::ProtocolError(amqp) = e.kind() {
        let said = amqp.get_message().to_string();
        return match amqp.get_id() {
            404 => Err(BatchError::Misconfigured(format!(
                "option \"exchange\": the broker has no exchange {exchange:?} ({said})"
            ))),
            406 => Ok(Outcome::Rejected(format!("{REFUSED}: {said}"))),
            // "access to topic 'k' in exchange 'x' in vhost '/' refused for user 'u'": this
            // routing key's fault; any other refusal is the user's rights on the exchange.
            403 if said.contains("access to topic") => {
                Ok(Outcome::Rejected(format!("{REFUSED}: {said}")))
            }
            403 => Err(BatchError::Misconfigured(format!(
                "option \"url\": its user may not publish to exchange {exchange:?} ({said})"
            ))),
            _ => Ok(Outcome::Deferred(e.to_string())),
        };
    }
    Ok(Outcome::Deferred(e.to_string()))
}

impl PublisherBackend for AmqpBackend {
    fn name(&self) -> &'static str {
        "amqp"
    }

    fn publish(&mut self, events: &[OutboxEvent]) -> Result<Vec<Outcome>, BatchError> {
        let channel = self.connect()?;
        let messages: Vec<Result<Message, String>> =
            events.iter().map(|e| self.message(e)).collect();
        let (exchange, timeout) = (self.config.exchange.clone(), self.config.timeout);
        let confirmed =
            self.runtime
                .block_on(send_batch(&channel, &exchange, messages.clone(), timeout));
        let (mut results, mut returned) = match confirmed {
            Ok(done) => done,
            Err(e) => {
                self.connection = None;
                return Err(e);
            }
        };
        // A message the broker refuses (406, 403 for its routing key) closes the channel,
        // failing every confirm still pending with the same error: each of those is sent again
        // alone, on a channel of its own, so that only the message at fault is charged. Within
        // one deadline, and not past the first failure to reach the broker: the rest wait for
        // the next batch.
        let refused: Vec<usize> = results
            .iter()
            .enumerate()
            .filter(|(_, r)| matches!(r, Confirmed::Outcome(Outcome::Rejected(why)) if why.starts_with(REFUSED)))
            .map(|(i, _)| i)
            .collect();
        if refused.len() > 1 {
            let resend_by = std::time::Instant::now() + timeout * 2;
            let mut away: Option<String> = None;
            // The batch's channel, closed by the refusal; then one per refused message, a
            // channel that confirmed its message being used again.
            self.connection = None;
            for i in refused {
                if away.is_none() && std::time::Instant::now() >= resend_by {
                    away = Some("not sent again alone in time".into());
                }
                if let Some(why) = &away {
                    results[i] = Confirmed::Outcome(Outcome::Deferred(why.clone()));
                    continue;
                }
                let channel = match self.connect() {
                    Ok(channel) => channel,
                    Err(e) => {
                        away = Some(e.reason().to_string());
                        results[i] = Confirmed::Outcome(Outcome::Deferred(e.reason().to_string()));
                        continue;
                    }
                };
                let alone = self.runtime.block_on(send_batch(
                    &channel,
                    &exchange,
                    vec![messages[i].clone()],
                    timeout,
                ));
                match alone {
                    Ok((mut result, back)) => {
                        returned.extend(back);
                        if let Some(r) = result.pop() {
                            match &r {
                                Confirmed::Outcome(Outcome::Deferred(_)) => {
                                    away = Some(
                                        "the broker did not confirm a message sent again alone"
                                            .into(),
                                    );
                                }
                                Confirmed::Outcome(Outcome::Rejected(_)) => self.connection = None,
                                _ => {}
                            }
                            results[i] = r;
                        }
                    }
                    Err(e) => {
                        away = Some(e.reason().to_string());
                        results[i] = Confirmed::Outcome(Outcome::Deferred(e.reason().to_string()))
                    }
                }
            }
            self.connection = None;
        }
        let outcomes: Vec<Outcome> = results
            .into_iter()
            .zip(events)
            .map(|(result, event)| match result {
                Confirmed::Acked if returned.contains(&event.id) => {
                    let key = event.stream.as_deref().unwrap_or(&self.config.routing_key);
                    Outcome::Rejected(format!(
                        "no queue took it (NO_ROUTE): nothing bound to exchange {:?} with routing key {key:?}",
                        self.config.exchange
                    ))
                }
                Confirmed::Acked => Outcome::Delivered,
                Confirmed::Outcome(outcome) => outcome,
            })
            .collect();
        // A refused publish closes the channel; a confirm given up on may still come, and take
        // a later message's return with it: either way, the next batch opens another channel.
        let unsure = outcomes.iter().any(|o| matches!(o, Outcome::Deferred(_)));
        let closed = self
            .connection
            .as_ref()
            .is_some_and(|(c, ch)| !(c.status().connected() && ch.status().connected()));
        if unsure || closed {
            self.connection = None;
        }
        let deferred = outcomes.iter().find_map(|o| match o {
            Outcome::Deferred(why) => Some(why.clone()),
            _ => None,
        });
        if let Some(why) = deferred {
            if !outcomes.contains(&Outcome::Delivered) {
                self.connection = None;
                return Err(self.unavailable(why));
            }
        }
        Ok(outcomes)
    }

    /// Connected, with an open channel.
    fn health_check(&mut self) -> Result<(), BatchError> {
        self.connect().map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> Result<AmqpConfig, ConfigError> {
        AmqpConfig::from_options(&crate::backend::test_options(Some("billing"), pairs))
    }

    #[test]
    fn options_say_what_is_wrong_without_the_password() {
        let c = config(&[("url", "amqp://relay:s3cret@rabbit:5672/%2f")]).expect("valid");
        assert_eq!(c.routing_key, "broadcaster.billing");
        assert!(!format!("{c:?}").contains("s3cret"));
        let err = config(&[("url", "http://u:s3cret@h")]).expect_err("refused");
        assert!(!err.to_string().contains("s3cret"), "{err}");
        assert!(config(&[("stream", &"k".repeat(256))]).is_err());
        assert!(
            config(&[("tls_ca_file", "/ca.pem")]).is_err(),
            "amqp:// with a CA"
        );
        assert!(config(&[("message_mode", "batched")]).is_err());
    }
}
