//! NATS JetStream backend: each event published to a subject with JetStream's acknowledgement,
//! in the CloudEvents NATS binding (binary mode: attributes as `ce-*` headers; or structured
//! mode), with `Nats-Msg-Id` set to the event's id so that JetStream drops a resend within its
//! stream's duplicate window. A batch's publishes are all sent before their acknowledgements are
//! awaited.
//!
//! ```sql
//! CREATE SERVER orders FOREIGN DATA WRAPPER broadcaster
//!   OPTIONS (backend 'nats', url 'nats://nats.internal:4222', stream 'orders.events');
//! ```
//!
//! Where an event goes: its `stream` (or the server's `stream` option) is the subject. A subject
//! no JetStream stream listens on is the event's fault (a rejection, dead after
//! `broadcaster.max_attempts`), as is a message over the server's `max_payload`; no connection,
//! no acknowledgement within `network_timeout`, or JetStream unavailable is an outage.

use std::future::IntoFuture;
use std::time::Duration;

use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use async_nats::{ConnectOptions, HeaderMap, HeaderValue};
use url::Url;

use super::binding::Mode;
use super::{
    binding, split_urls, Backend, BatchError, Config, ConfigError, Options, Outcome,
    PublisherBackend,
};
use crate::event::OutboxEvent;

/// `CREATE SERVER ... OPTIONS (backend 'nats', url '...', ...)`.
#[derive(Clone)]
pub struct NatsConfig {
    /// `url`: `nats://[user:password@]host[:port]`, or several separated by commas (a cluster's
    /// servers); `tls://` for TLS. Credentials are taken from the first URL that has them.
    /// Secret: a URL with a password belongs in a `USER MAPPING`.
    pub servers: Vec<String>,
    /// User and password from the URL.
    pub credentials: Option<(String, String)>,
    /// `stream`: the subject of events whose `stream` column is NULL. Default
    /// `broadcaster.<server>`.
    pub subject: String,
    /// `stream_prefix`: every subject an event names must start with this; empty: any.
    pub stream_prefix: String,
    /// `message_mode`: `binary` (the default: attributes as `ce-*` headers, `content-type` the
    /// data's, the data as the payload) or `structured`.
    pub mode: Mode,
    /// `network_timeout` (milliseconds): bound on connecting and on each acknowledgement.
    pub timeout: Duration,
    /// `tls_ca_file`: CA certificates (PEM) to trust instead of the system's; implies TLS.
    pub tls_ca_file: String,
    /// `tls_cert_file`, `tls_key_file`: client certificate and key (PEM) for mutual TLS.
    pub tls_cert_file: String,
    pub tls_key_file: String,
}

impl std::fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsConfig")
            .field("servers", &self.servers)
            .field("subject", &self.subject)
            .field("mode", &self.mode)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Whether `subject` is one a message can be published to: dot-separated tokens, none empty,
/// no wildcard (`*`, `>`), no whitespace or control character (the NATS protocol's rules); and
/// not a system subject (`$JS.API.STREAM.DELETE.<stream>`, `$SYS...`, `$KV...`: an event
/// would act with the relay's credentials) or a reply inbox (`_INBOX.`: it would answer
/// another client's request).
pub fn check_subject(subject: &str) -> Result<(), String> {
    if subject.len() > 1024 {
        return Err(format!("subject of {} bytes; at most 1024", subject.len()));
    }
    if subject.starts_with('$') || subject.starts_with("_INBOX.") {
        return Err(format!(
            "{subject:?} is not a subject events may go to: subjects starting with $ are the server's own API (JetStream, system, key-value) and _INBOX. subjects are other clients' replies"
        ));
    }
    let bad_token = subject.split('.').find(|t| {
        t.is_empty()
            || *t == "*"
            || *t == ">"
            || t.chars().any(|c| c.is_whitespace() || c.is_control())
    });
    match bad_token {
        None => Ok(()),
        Some(_) => Err(format!(
            "{subject:?} is not a NATS subject to publish to: dot-separated tokens, none empty, no wildcard (* or >), no whitespace"
        )),
    }
}

impl Config for NatsConfig {
    const OPTIONS: &'static [&'static str] = &[
        "url",
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
        let text = options.text("url", "nats://127.0.0.1:4222");
        let mut servers = Vec::new();
        let mut credentials = None;
        for one in split_urls(&text) {
            // Never quoted: it may hold a password.
            let url = Url::parse(one).map_err(|e| {
                ConfigError::invalid(
                    "url",
                    format!("not a valid URL ({e}); expected nats://[user:password@]host[:port], or several separated by commas"),
                )
            })?;
            if !matches!(url.scheme(), "nats" | "tls") || url.host_str().is_none() {
                return Err(ConfigError::invalid(
                    "url",
                    format!(
                        "a {}:// URL; expected nats:// or tls:// with a host",
                        url.scheme()
                    ),
                ));
            }
            // `nats://token@host`: a user without a password is a token.
            if credentials.is_none() && !url.username().is_empty() {
                let decode = |s: &str| {
                    percent_encoding::percent_decode_str(s)
                        .decode_utf8_lossy()
                        .into_owned()
                };
                credentials = Some((
                    decode(url.username()),
                    decode(url.password().unwrap_or_default()),
                ));
            }
            let host = url.host_str().unwrap_or_default();
            let port = url.port().unwrap_or(4222);
            servers.push(format!("{}://{host}:{port}", url.scheme()));
        }
        if servers.is_empty() {
            return Err(ConfigError::invalid("url", "no NATS server given"));
        }
        let context = &options.context;
        let default_subject = match &context.server {
            Some(server) => format!("broadcaster.{server}"),
            None => "broadcaster.events".to_string(),
        };
        let config = NatsConfig {
            servers,
            credentials,
            subject: options.text("stream", &default_subject),
            stream_prefix: options.text("stream_prefix", ""),
            mode: options.message_mode()?,
            timeout: options.timeout("network_timeout")?,
            tls_ca_file: options.text("tls_ca_file", ""),
            tls_cert_file: options.text("tls_cert_file", ""),
            tls_key_file: options.text("tls_key_file", ""),
        };
        super::check_tls_files(
            &config.tls_ca_file,
            &config.tls_cert_file,
            &config.tls_key_file,
            None,
        )?;
        check_subject(&config.subject).map_err(|why| {
            ConfigError::invalid(
                "stream",
                format!("{why} (the default is broadcaster.<server>: set stream when the server's name makes no subject)"),
            )
        })?;
        crate::event::validate_stream(&config.subject, &config.stream_prefix)
            .map_err(|e| ConfigError::invalid("stream", e.to_string()))?;
        Ok(config)
    }
}

/// A connected client and its JetStream context.
struct Connection {
    client: async_nats::Client,
    jetstream: async_nats::jetstream::Context,
}

pub struct NatsBackend {
    config: NatsConfig,
    /// Runs the client's connection (pings, reconnects) between batches too: a thread of its
    /// own, started with the relay's signals held, that never calls Postgres.
    runtime: tokio::runtime::Runtime,
    connection: Option<Connection>,
}

impl Backend for NatsBackend {
    type Config = NatsConfig;

    fn new(config: NatsConfig) -> Result<Self, BatchError> {
        Ok(NatsBackend {
            config,
            runtime: super::runtime("nats")?,
            connection: None,
        })
    }
}

/// A message ready to publish.
struct Message {
    subject: String,
    headers: HeaderMap,
    payload: bytes::Bytes,
}

impl NatsBackend {
    fn servers(&self) -> String {
        self.config.servers.join(",")
    }

    fn unavailable(&self, why: impl std::fmt::Display) -> BatchError {
        BatchError::Unavailable(format!("{}: {why}", self.servers()))
    }

    /// Connects, unless connected. The client then reconnects by itself after a loss; while it
    /// is away, publishes time out (an outage).
    fn connect(&mut self) -> Result<&Connection, BatchError> {
        if self.connection.is_none() {
            let config = &self.config;
            let mut options = ConnectOptions::new()
                .connection_timeout(config.timeout)
                .request_timeout(Some(config.timeout))
                .name(format!("broadcaster {}", env!("CARGO_PKG_VERSION")));
            match &config.credentials {
                Some((token, password)) if password.is_empty() => {
                    options = options.token(token.clone());
                }
                Some((user, password)) => {
                    options = options.user_and_password(user.clone(), password.clone());
                }
                None => {}
            }
            if !config.tls_ca_file.is_empty() {
                options = options
                    .add_root_certificates(config.tls_ca_file.clone().into())
                    .require_tls(true);
            }
            if !config.tls_cert_file.is_empty() {
                options = options.add_client_certificate(
                    config.tls_cert_file.clone().into(),
                    config.tls_key_file.clone().into(),
                );
            }
            let servers: Vec<async_nats::ServerAddr> = config
                .servers
                .iter()
                .filter_map(|s| s.parse().ok())
                .collect();
            let timeout = config.timeout;
            let connected = self.runtime.block_on(async move {
                let client = tokio::time::timeout(timeout * 2, options.connect(servers))
                    .await
                    .map_err(|_| "connecting timed out".to_string())?
                    .map_err(|e| e.to_string())?;
                let mut jetstream = async_nats::jetstream::new(client.clone());
                jetstream.set_timeout(timeout);
                Ok::<_, String>(Connection { client, jetstream })
            });
            self.connection = Some(connected.map_err(|e| self.unavailable(e))?);
        }
        self.connection
            .as_ref()
            .ok_or_else(|| self.unavailable("not connected"))
    }

    /// `event` as a message, or why it makes none.
    fn message(&self, event: &OutboxEvent) -> Result<Message, String> {
        let subject = event.stream.as_deref().unwrap_or(&self.config.subject);
        check_subject(subject)?;
        crate::event::validate_stream(subject, &self.config.stream_prefix)
            .map_err(|e| e.to_string())?;
        let mut headers = HeaderMap::new();
        let header = |value: &str| -> Result<HeaderValue, String> {
            value
                .parse::<HeaderValue>()
                .map_err(|e| format!("a header value NATS refuses: {e}"))
        };
        headers.insert(async_nats::header::NATS_MESSAGE_ID, header(&event.id)?);
        let payload = match self.config.mode {
            Mode::Binary => {
                for (name, value) in
                    binding::attributes(event, "ce-", binding::Values::PercentEncoded)?
                {
                    headers.insert(name.as_str(), header(&value)?);
                }
                headers.insert("content-type", header(&event.datacontenttype)?);
                event
                    .data_bytes()
                    .map_err(|e| e.to_string())?
                    .map(|data| bytes::Bytes::copy_from_slice(&data))
                    .unwrap_or_default()
            }
            Mode::Structured => {
                headers.insert("content-type", header(binding::STRUCTURED_CONTENT_TYPE)?);
                bytes::Bytes::from(event.structured_json().map_err(|e| e.to_string())?)
            }
        };
        Ok(Message {
            subject: subject.to_string(),
            headers,
            payload,
        })
    }
}

/// How a rejection for a subject no stream listens on starts: [`unheard`] checks it.
const NO_STREAM: &str = "no JetStream stream listens on subject";

/// Most publishes awaiting their acknowledgement at once: below the JetStream context's own
/// bound (5,000 by default), past which a publish fails.
const WINDOW: usize = 4096;

/// Whether JetStream says no stream takes `subject` (so that a "no responders" is the event's
/// fault); false when it names one, or does not answer by `deadline` (JetStream starting, a
/// leader being elected: an outage).
async fn unheard(
    jetstream: &async_nats::jetstream::Context,
    subject: &str,
    deadline: tokio::time::Instant,
) -> bool {
    use async_nats::jetstream::context::GetStreamByNameErrorKind;
    match tokio::time::timeout_at(deadline, jetstream.stream_by_subject(subject)).await {
        Ok(Err(e)) => matches!(e.kind(), GetStreamByNameErrorKind::NotFound),
        _ => false,
    }
}

/// What JetStream's answer to one publish means.
fn classify(
    result: Result<(), async_nats::jetstream::context::PublishError>,
    subject: &str,
) -> Outcome {
    let Err(e) = result else {
        return Outcome::Delivered;
    };
    match e.kind() {
        // "No responders": no stream listens on the subject, or JetStream is starting or
        // electing a leader. Confirmed by asking JetStream before it is charged ([`unheard`]).
        PublishErrorKind::StreamNotFound => Outcome::Rejected(format!("{NO_STREAM} {subject:?}")),
        PublishErrorKind::MaxPayloadExceeded => Outcome::Rejected(format!(
            "the message is larger than the server's max_payload: {e}"
        )),
        PublishErrorKind::WrongLastMessageId | PublishErrorKind::WrongLastSequence => {
            Outcome::Rejected(e.to_string())
        }
        PublishErrorKind::Other => {
            // A JetStream API error about the message (code 400-class) is the event's fault;
            // JetStream unavailable (503) or anything else, an outage.
            let api = std::error::Error::source(&e)
                .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>());
            use async_nats::jetstream::ErrorCode;
            match api {
                // A resend meeting its first copy still being stored; JetStream too busy.
                Some(api)
                    if api.error_code() == ErrorCode::STREAM_DUPLICATE_MESSAGE_CONFLICT
                        || api.error_code() == ErrorCode::STREAM_TOO_MANY_REQUESTS =>
                {
                    Outcome::Deferred(format!("JetStream: {api}"))
                }
                Some(api) if (400..500).contains(&api.code()) => {
                    Outcome::Rejected(format!("JetStream refused it: {api}"))
                }
                _ => Outcome::Deferred(e.to_string()),
            }
        }
        _ => Outcome::Deferred(e.to_string()),
    }
}

impl PublisherBackend for NatsBackend {
    fn name(&self) -> &'static str {
        "nats"
    }

    fn publish(&mut self, events: &[OutboxEvent]) -> Result<Vec<Outcome>, BatchError> {
        let messages: Vec<Result<Message, String>> =
            events.iter().map(|e| self.message(e)).collect();
        let timeout = self.config.timeout;
        let jetstream = self.connect()?.jetstream.clone();
        let outcomes = self.runtime.block_on(async move {
            let mut outcomes: Vec<Outcome> = Vec::with_capacity(messages.len());
            // Each outcome's subject, where the event has one.
            let mut subjects: Vec<Option<String>> = Vec::with_capacity(messages.len());
            let mut messages = messages.into_iter();
            let mut away: Option<String> = None;
            loop {
                // A window's publishes first (JetStream acknowledges them as they land), then
                // its acks. One deadline for a window's sends, one for its acks: once either
                // passes, the server is away and the rest of the batch is not sent, so a
                // frozen server holds the batch for at most twice the timeout.
                let window: Vec<Result<Message, String>> = messages.by_ref().take(WINDOW).collect();
                if window.is_empty() {
                    break;
                }
                let send_by = tokio::time::Instant::now() + timeout;
                let mut pending: Vec<(Result<PublishAckFuture, Outcome>, Option<String>)> =
                    Vec::with_capacity(window.len());
                for message in window {
                    let message = match message {
                        Ok(m) => m,
                        Err(why) => {
                            pending.push((Err(Outcome::Rejected(why)), None));
                            continue;
                        }
                    };
                    let subject = message.subject.clone();
                    if let Some(why) = &away {
                        pending.push((Err(Outcome::Deferred(why.clone())), Some(subject)));
                        continue;
                    }
                    let sent = tokio::time::timeout_at(
                        send_by,
                        jetstream.publish_with_headers(
                            message.subject,
                            message.headers,
                            message.payload,
                        ),
                    )
                    .await;
                    let sent = match sent {
                        Ok(Ok(ack)) => Ok(ack),
                        Ok(Err(e)) => Err(classify(Err(e), &subject)),
                        Err(_) => {
                            let why = "sending timed out: the server is away".to_string();
                            away = Some(why.clone());
                            Err(Outcome::Deferred(why))
                        }
                    };
                    pending.push((sent, Some(subject)));
                }
                let ack_by = tokio::time::Instant::now() + timeout;
                for (p, subject) in pending {
                    let outcome = match p {
                        Err(outcome) => outcome,
                        Ok(ack) => match tokio::time::timeout_at(ack_by, ack.into_future()).await {
                            Ok(acked) => classify(acked.map(drop), subject.as_deref().unwrap_or("")),
                            Err(_) => {
                                away = Some("no acknowledgement in time".into());
                                Outcome::Deferred("no acknowledgement in time".into())
                            }
                        },
                    };
                    outcomes.push(outcome);
                    subjects.push(subject);
                }
            }
            // A subject nobody listens on is charged only once JetStream confirms it; the
            // checks share one deadline.
            let check_by = tokio::time::Instant::now() + timeout;
            let mut checked: std::collections::HashMap<String, bool> = Default::default();
            for (outcome, subject) in outcomes.iter_mut().zip(&subjects) {
                let (Outcome::Rejected(why), Some(subject)) = (&*outcome, subject) else {
                    continue;
                };
                if !why.starts_with(NO_STREAM) {
                    continue;
                }
                let unheard = match checked.get(subject) {
                    Some(&known) => known,
                    None => {
                        let known = unheard(&jetstream, subject, check_by).await;
                        checked.insert(subject.clone(), known);
                        known
                    }
                };
                if !unheard {
                    *outcome = Outcome::Deferred(format!(
                        "no responders on subject {subject:?}, though a stream takes it: JetStream unavailable"
                    ));
                }
            }
            outcomes
        });
        // Nothing delivered and the server away: an outage of the whole batch.
        let deferred = outcomes.iter().find_map(|o| match o {
            Outcome::Deferred(why) => Some(why.clone()),
            _ => None,
        });
        if let Some(why) = deferred {
            if !outcomes.contains(&Outcome::Delivered) {
                return Err(self.unavailable(why));
            }
        }
        Ok(outcomes)
    }

    /// Connected, and the server answers a flush within `network_timeout`.
    fn health_check(&mut self) -> Result<(), BatchError> {
        let timeout = self.config.timeout;
        let client = self.connect()?.client.clone();
        let flushed = self
            .runtime
            .block_on(async move { tokio::time::timeout(timeout, client.flush()).await });
        match flushed {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.unavailable(e)),
            Err(_) => Err(self.unavailable("no answer to a flush in time")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> Result<NatsConfig, ConfigError> {
        NatsConfig::from_options(&crate::backend::test_options(Some("orders"), pairs))
    }

    #[test]
    fn options_say_what_is_wrong_without_the_password() {
        let c = config(&[("url", "nats://relay:p%40ss@h1:4223,nats://h2")]).expect("valid");
        assert_eq!(c.servers, ["nats://h1:4223", "nats://h2:4222"]);
        assert_eq!(
            c.credentials,
            Some(("relay".to_string(), "p@ss".to_string()))
        );
        assert_eq!(c.subject, "broadcaster.orders");
        let err = config(&[("url", "redis://u:s3cret@h")]).expect_err("refused");
        assert!(!err.to_string().contains("s3cret"), "{err}");
        assert!(config(&[("stream", "orders.*")]).is_err());
        assert!(config(&[("stream", "orders..x")]).is_err());
        assert!(config(&[("message_mode", "batched")]).is_err());
        assert!(config(&[("tls_key_file", "/k.pem")]).is_err());
    }

    #[test]
    fn subjects_follow_the_protocol() {
        assert!(check_subject("orders.eu.created").is_ok());
        for bad in [
            "",
            "a..b",
            ".a",
            "a.",
            "a.*",
            "a.>",
            "a b",
            "a\tb",
            "$JS.API.STREAM.DELETE.ORDERS",
            "$SYS.REQ.SERVER.PING",
            "_INBOX.abc",
        ] {
            assert!(check_subject(bad).is_err(), "{bad:?}");
        }
    }
}
