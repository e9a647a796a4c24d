//! Webhook backend: each event POSTed to an HTTP endpoint in the CloudEvents HTTP protocol
//! binding (binary or structured mode, or several events per request in batched mode), signed
//! as [Standard Webhooks](https://www.standardwebhooks.com/) sign them, over kept-alive
//! connections (several at once).
//!
//! ```sql
//! CREATE SERVER hooks FOREIGN DATA WRAPPER broadcaster
//!   OPTIONS (backend 'webhook', url 'https://hooks.example.com/events');
//! CREATE USER MAPPING FOR PUBLIC SERVER hooks OPTIONS (secret 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw');
//! ```
//!
//! Where an event goes: `url`, then its `stream` (or the server's `stream` option) as one more
//! path segment, percent-encoded (`orders/eu` is the one segment `orders%2Feu`): streams never
//! reach another path of the host.
//!
//! What a reply means (as the Redis backend's replies do):
//! - 2xx: delivered.
//! - 408, 429, 5xx, no connection, a timeout: an outage. Nothing is counted against the event;
//!   the relay backs off and sends it again.
//! - 413: the event is too large for the receiver; any other 4xx: the receiver refuses this
//!   event. A rejection, counted; dead after `broadcaster.max_attempts`.
//! - 3xx: the `url` option is wrong (the endpoint moved): redirects are not followed (a `POST`
//!   turned into a `GET` would lose the event). Nothing counted; the log says so. Events of the
//!   batch that other requests delivered stay delivered.
//!
//! Logs, `last_error` and `broadcaster_status` show the receiver as scheme, host and port and
//! the event's stream segment, never the configured path: many webhook URLs carry their token
//! in it (`https://hooks.slack.com/services/T…/B…/<token>`).
//!
//! Each request carries `webhook-id` (the event's id: the same on every resend, so a receiver
//! drops duplicates with it), `webhook-timestamp` (seconds since 1970) and, with a signing
//! secret, `webhook-signature` (`v1,` and the base64 HMAC-SHA256 of `id.timestamp.body`).

use std::borrow::Cow;
use std::io::Read;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use url::Url;

use super::{
    binding, Backend, BatchError, Config, ConfigError, Options, Outcome, Pipelined,
    PublisherBackend, TlsFiles,
};
use crate::event::OutboxEvent;

/// Content type of a structured-mode request (CloudEvents JSON format).
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json; charset=utf-8";
/// Content type of a batched-mode request (CloudEvents JSON batch format).
pub const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json; charset=utf-8";
/// What a signing secret starts with (Standard Webhooks).
const SECRET_PREFIX: &str = "whsec_";
/// Most bytes of a refusal's body quoted in the event's `last_error`.
const QUOTED_BODY: usize = 200;

/// How events are laid out in requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpMode {
    /// One event per request: attributes as `ce-*` headers, the data as the body.
    Binary,
    /// One event per request, the whole event as `application/cloudevents+json`.
    Structured,
    /// The batch's events of one destination in one request, as
    /// `application/cloudevents-batch+json` (a JSON array of structured events).
    Batched,
}

/// `CREATE SERVER ... OPTIONS (backend 'webhook', url '...', ...)`.
#[derive(Clone)]
pub struct WebhookConfig {
    /// `url`: `http://` or `https://`, with any path; credentials in it
    /// (`https://user:password@host/`) are sent as HTTP Basic authentication. Secret: a URL
    /// with a password belongs in a `USER MAPPING`.
    pub url: Url,
    /// `Authorization: Basic ...`, from the URL's credentials.
    pub authorization: Option<String>,
    /// `stream`: the path segment of events whose `stream` column is NULL; empty (the default):
    /// those go to `url` itself.
    pub stream: String,
    /// `stream_prefix`: every stream an event names must start with this; empty: any.
    pub stream_prefix: String,
    /// `message_mode`: `binary` (the default), `structured` or `batched`.
    pub mode: HttpMode,
    /// `network_timeout` (milliseconds): bound on each request, from connecting to the reply's
    /// last byte; default `broadcaster.network_timeout`.
    pub timeout: Duration,
    /// `connections`: requests in flight at once, each on its own kept-alive connection;
    /// default 4, at most 64.
    pub connections: usize,
    /// `secret`, in a `USER MAPPING` only: the Standard Webhooks signing key, `whsec_` and
    /// base64. Unset: requests are not signed.
    pub secret: Option<Vec<u8>>,
    /// `tls_ca_file`: CA certificates (PEM) for `https://`; unset: the system's.
    pub tls_ca_file: String,
    /// `tls_cert_file`, `tls_key_file`: client certificate and key (PEM) for mutual TLS.
    pub tls_cert_file: String,
    pub tls_key_file: String,
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &self.url.as_str())
            .field("stream", &self.stream)
            .field("mode", &self.mode)
            .field("timeout", &self.timeout)
            .field("connections", &self.connections)
            .finish_non_exhaustive()
    }
}

impl Config for WebhookConfig {
    const OPTIONS: &'static [&'static str] = &[
        "url",
        "stream",
        "stream_prefix",
        "message_mode",
        "network_timeout",
        "connections",
        "tls_ca_file",
        "tls_cert_file",
        "tls_key_file",
    ];
    /// `secret` is not a server option at all: every role reads those.
    const SECRETS: &'static [&'static str] = &["url", "secret"];
    const SUPERUSER_OPTIONS: &'static [&'static str] =
        &["tls_ca_file", "tls_cert_file", "tls_key_file"];

    fn from_options(options: &Options) -> Result<Self, ConfigError> {
        let mut text = options.text("url", "");
        if text.is_empty() {
            // At CREATE SERVER, the URL may be left to a user mapping (it holds a password).
            if !options.context.database.is_empty() {
                return Err(ConfigError::invalid(
                    "url",
                    "the webhook backend needs the endpoint's URL (in the server's options, or in a user mapping when it holds a password)",
                ));
            }
            text = "http://localhost/".into();
        }
        // The error never quotes the URL: it may hold a password.
        let mut url = Url::parse(&text).map_err(|e| {
            ConfigError::invalid(
                "url",
                format!(
                    "not a valid URL ({e}); expected http[s]://[user:password@]host[:port][/path]"
                ),
            )
        })?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(ConfigError::invalid(
                "url",
                format!(
                    "a {}:// URL; expected http:// or https:// with a host",
                    url.scheme()
                ),
            ));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(ConfigError::invalid(
                "url",
                "no query or fragment: the event's stream is added to the path",
            ));
        }
        let authorization = (!url.username().is_empty() || url.password().is_some()).then(|| {
            let user = percent_encoding::percent_decode_str(url.username()).decode_utf8_lossy();
            let password = url
                .password()
                .map(|p| percent_encoding::percent_decode_str(p).decode_utf8_lossy())
                .unwrap_or_default();
            let pair = format!("{user}:{password}");
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            )
        });
        // Infallible for http(s) URLs with a host.
        let _ = url.set_username("");
        let _ = url.set_password(None);
        let secret = match options.get("secret") {
            None | Some("") => None,
            Some(secret) => Some(signing_key(secret)?),
        };
        let connections: usize = options.parse("connections", 4)?;
        if !(1..=64).contains(&connections) {
            return Err(ConfigError::invalid(
                "connections",
                format!("{connections}; between 1 and 64"),
            ));
        }
        let config = WebhookConfig {
            url,
            authorization,
            stream: options.text("stream", ""),
            stream_prefix: options.text("stream_prefix", ""),
            mode: match options.get("message_mode").unwrap_or("binary") {
                "binary" => HttpMode::Binary,
                "structured" => HttpMode::Structured,
                "batched" => HttpMode::Batched,
                other => {
                    return Err(ConfigError::invalid(
                        "message_mode",
                        format!("{other:?}; expected binary, structured or batched"),
                    ))
                }
            },
            timeout: options.timeout("network_timeout")?,
            connections,
            secret,
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
        if !config.stream.is_empty() {
            path_segment(&config.stream, &config.stream_prefix)
                .map_err(|why| ConfigError::invalid("stream", why))?;
        }
        Ok(config)
    }
}

/// The key of a Standard Webhooks secret: `whsec_` and base64.
fn signing_key(secret: &str) -> Result<Vec<u8>, ConfigError> {
    // Never quoted: it is the secret.
    let why = "expected whsec_ followed by base64 (Standard Webhooks), as `whsec_` || base64 of 24 to 64 random bytes";
    let encoded = secret
        .strip_prefix(SECRET_PREFIX)
        .ok_or_else(|| ConfigError::invalid("secret", why))?;
    let key = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| ConfigError::invalid("secret", why))?;
    if key.len() < 16 {
        return Err(ConfigError::invalid(
            "secret",
            format!("{} bytes is too short a key; at least 16", key.len()),
        ));
    }
    Ok(key)
}

/// A stream as a path segment: within `prefix`, and neither `.` nor `..`, which a server would
/// resolve to another path.
fn path_segment(stream: &str, prefix: &str) -> Result<(), String> {
    crate::event::validate_stream(stream, prefix).map_err(|e| e.to_string())?;
    if stream == "." || stream == ".." {
        return Err(format!(
            "stream {stream:?} is not a path segment a webhook can be sent to"
        ));
    }
    Ok(())
}

pub struct WebhookBackend {
    sender: Arc<Sender>,
    /// The batch [`Pipelined::send`] started, sending on threads of its own.
    in_flight: Option<std::thread::JoinHandle<Result<Vec<Outcome>, BatchError>>>,
}

/// What sending needs, shared with the threads that send a batch while the relay claims the
/// next one.
struct Sender {
    config: WebhookConfig,
    agent: ureq::Agent,
    /// `scheme://host:port/path` of `url`, for messages (never the credentials).
    shown: String,
}

impl Backend for WebhookBackend {
    type Config = WebhookConfig;

    fn new(config: WebhookConfig) -> Result<Self, BatchError> {
        let tls = tls_config(&config)?;
        let agent_config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .max_redirects_will_error(false)
            .timeout_global(Some(config.timeout))
            .max_idle_connections(config.connections)
            .max_idle_connections_per_host(config.connections)
            .user_agent(concat!("broadcaster/", env!("CARGO_PKG_VERSION")))
            .tls_config(tls)
            .build();
        let agent = ureq::Agent::with_parts(
            agent_config,
            ureq::unversioned::transport::DefaultConnector::default(),
            Resolver::default(),
        );
        let shown = shown(&config.url, &config.url);
        Ok(WebhookBackend {
            sender: Arc::new(Sender {
                config,
                agent,
                shown,
            }),
            in_flight: None,
        })
    }
}

/// How long a host name's addresses are used before they are looked up again.
const RESOLVED_FOR: Duration = Duration::from_secs(5);

/// ureq's own resolver, but without a thread per request. Given a timeout, ureq's resolves on a
/// thread of its own for every request, kept-alive connection or not (measured in a drain: a
/// thread made for about every 8 events, and the relay spending a core on it). Here an IP
/// address is taken as it is, and a host name's addresses are kept for [`RESOLVED_FOR`].
#[derive(Debug, Default)]
struct Resolver {
    inner: ureq::unversioned::resolver::DefaultResolver,
    /// `host:port` and when it was looked up, with its addresses.
    known:
        Mutex<std::collections::HashMap<String, (std::time::Instant, Vec<std::net::SocketAddr>)>>,
}

impl ureq::unversioned::resolver::Resolver for Resolver {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<ureq::unversioned::resolver::ResolvedSocketAddrs, ureq::Error> {
        let port = uri.port_u16().or(match uri.scheme_str() {
            Some("https") => Some(443),
            Some("http") => Some(80),
            _ => None,
        });
        let (Some(host), Some(port)) = (uri.host(), port) else {
            return self.inner.resolve(uri, config, timeout);
        };
        let addresses = |found: &[std::net::SocketAddr]| {
            let mut addresses = self.empty();
            for a in found.iter().take(16) {
                addresses.push(*a);
            }
            addresses
        };
        if let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse() {
            return Ok(addresses(&[std::net::SocketAddr::new(ip, port)]));
        }
        let key = format!("{host}:{port}");
        if let Ok(known) = self.known.lock() {
            if let Some((at, found)) = known.get(&key) {
                if at.elapsed() < RESOLVED_FOR {
                    return Ok(addresses(found));
                }
            }
        }
        let resolved = self.inner.resolve(uri, config, timeout)?;
        if let Ok(mut known) = self.known.lock() {
            known.insert(
                key,
                (
                    std::time::Instant::now(),
                    resolved.iter().copied().collect(),
                ),
            );
        }
        Ok(resolved)
    }
}

/// TLS as the options say: native TLS (OpenSSL), the CA file's certificates or the system's,
/// the client certificate and key. Read here, at the relay's start, not at `CREATE SERVER`.
fn tls_config(config: &WebhookConfig) -> Result<ureq::tls::TlsConfig, BatchError> {
    use ureq::tls::{Certificate, ClientCert, PemItem, PrivateKey, RootCerts, TlsProvider};
    let certificates =
        |option: &str, pem: &[u8]| -> Result<Vec<Certificate<'static>>, BatchError> {
            let certificates: Vec<Certificate<'static>> = ureq::tls::parse_pem(pem)
                .filter_map(|item| match item {
                    Ok(PemItem::Certificate(c)) => Some(c),
                    _ => None,
                })
                .collect();
            if certificates.is_empty() {
                return Err(BatchError::Misconfigured(format!(
                    "option \"{option}\": no PEM certificate in the file"
                )));
            }
            Ok(certificates)
        };
    let files = TlsFiles::read(
        &config.tls_ca_file,
        &config.tls_cert_file,
        &config.tls_key_file,
    )?;
    let mut tls = ureq::tls::TlsConfig::builder().provider(TlsProvider::NativeTls);
    tls = match files.ca {
        Some(pem) => tls.root_certs(RootCerts::new_with_certs(&certificates(
            "tls_ca_file",
            &pem,
        )?)),
        None => tls.root_certs(RootCerts::PlatformVerifier),
    };
    if let Some((cert, key)) = files.identity {
        let chain = certificates("tls_cert_file", &cert)?;
        let key = PrivateKey::from_pem(&key)
            .map_err(|e| BatchError::Misconfigured(format!("option \"tls_key_file\": {e}")))?;
        tls = tls.client_cert(Some(ClientCert::new_with_certs(&chain, key)));
    }
    Ok(tls.build())
}

/// One request, ready to send.
#[derive(Clone)]
struct Request {
    url: Url,
    /// `webhook-id`.
    id: String,
    content_type: String,
    /// `ce-*` headers (binary mode), values already percent-encoded.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// What one request came to.
#[derive(Clone)]
enum Reply {
    Delivered,
    /// The event's (or batch's) fault.
    Rejected(String),
    /// The receiver is down or overloaded: back off.
    Outage(String),
    /// The endpoint is not where the URL says (a redirect): the server's configuration.
    Misconfigured(String),
}

impl Sender {
    /// Where an event goes: `url`, plus its stream (or the default one) as a path segment.
    fn destination(&self, event: &OutboxEvent) -> Result<Url, String> {
        let stream = event.stream.as_deref().unwrap_or(&self.config.stream);
        let mut url = self.config.url.clone();
        if stream.is_empty() && event.stream.is_none() {
            return Ok(url);
        }
        path_segment(stream, &self.config.stream_prefix)?;
        // Infallible: an http(s) URL with a host can be a base.
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.pop_if_empty().push(stream);
        }
        Ok(url)
    }

    /// The request carrying `event` alone, in binary or structured mode.
    fn single(&self, event: &OutboxEvent) -> Result<Request, String> {
        let url = self.destination(event)?;
        let (content_type, headers, body) = if self.config.mode == HttpMode::Binary {
            let headers = binding::attributes(event, "ce-", binding::Values::PercentEncoded)?;
            let body = event
                .data_bytes()
                .map_err(|e| e.to_string())?
                .map(Cow::into_owned)
                .unwrap_or_default();
            (event.datacontenttype.clone(), headers, body)
        } else {
            let body = event.structured_json().map_err(|e| e.to_string())?;
            (STRUCTURED_CONTENT_TYPE.to_string(), Vec::new(), body)
        };
        Ok(Request {
            url,
            id: event.id.clone(),
            content_type,
            headers,
            body,
        })
    }

    /// Sends `request`: its headers, the Standard Webhooks ones, the body.
    fn send(&self, request: &Request) -> Reply {
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default()
            .to_string();
        let mut builder = http::Request::post(request.url.as_str())
            .header("content-type", request.content_type.as_str())
            .header("webhook-id", request.id.as_str())
            .header("webhook-timestamp", timestamp.as_str());
        for (name, value) in &request.headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        if let Some(authorization) = &self.config.authorization {
            builder = builder.header("authorization", authorization.as_str());
        }
        if let Some(key) = &self.config.secret {
            builder = builder.header(
                "webhook-signature",
                signature(key, &request.id, &timestamp, &request.body),
            );
        }
        let http_request = match builder.body(request.body.as_slice()) {
            Ok(r) => r,
            Err(e) => return Reply::Rejected(format!("not a valid HTTP request: {e}")),
        };
        match self.agent.run(http_request) {
            Ok(mut response) => {
                let status = response.status().as_u16();
                // Read to the end, so that the connection is kept alive; a refusal's text is
                // quoted (its start) in the event's last_error.
                let mut text = Vec::new();
                let _ = response
                    .body_mut()
                    .as_reader()
                    .take(64 * 1024)
                    .read_to_end(&mut text);
                classify(status, &text, &shown(&self.config.url, &request.url))
            }
            Err(e) => Reply::Outage(format!(
                "POST {}: {e}",
                shown(&self.config.url, &request.url)
            )),
        }
    }

    /// Sends `n` requests over up to `connections` connections at once, each built by
    /// `request(i)` on the thread that sends it (so that encoding runs in parallel too); once
    /// one finds the receiver unreachable, the rest are not sent.
    fn send_all(
        &self,
        n: usize,
        request: &(dyn Fn(usize) -> Result<Request, String> + Sync),
    ) -> Vec<Reply> {
        let replies: Vec<Mutex<Option<Reply>>> = (0..n).map(|_| Mutex::new(None)).collect();
        let down = AtomicBool::new(false);
        let next = std::sync::atomic::AtomicUsize::new(0);
        let work = || loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                return;
            }
            let reply = match request(i) {
                Err(why) => Reply::Rejected(why),
                Ok(_) if down.load(Ordering::Relaxed) => {
                    Reply::Outage("not sent: the receiver was unreachable".into())
                }
                Ok(request) => {
                    let reply = self.send(&request);
                    if matches!(reply, Reply::Outage(_)) {
                        down.store(true, Ordering::Relaxed);
                    }
                    reply
                }
            };
            if let Ok(mut slot) = replies[i].lock() {
                *slot = Some(reply);
            }
        };
        let threads = self.config.connections.min(n).max(1);
        if threads == 1 {
            work();
        } else {
            std::thread::scope(|scope| {
                for _ in 1..threads {
                    scope.spawn(work);
                }
                work();
            });
        }
        replies
            .into_iter()
            .map(|slot| {
                slot.into_inner()
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| Reply::Outage("not sent".into()))
            })
            .collect()
    }

    /// Batched mode: the events of each destination in one request; a refused request of
    /// several events is sent again one event per request, so that only the event at fault
    /// is charged.
    fn publish_batched(&self, events: &[OutboxEvent]) -> Vec<Reply> {
        let mut replies: Vec<Option<Reply>> = events.iter().map(|_| None).collect();
        // Each event's destination and JSON, or why it has none.
        let mut parts: Vec<Option<(Url, Vec<u8>)>> = Vec::with_capacity(events.len());
        for (i, event) in events.iter().enumerate() {
            let part = self.destination(event).and_then(|url| {
                let json = event.structured_json().map_err(|e| e.to_string())?;
                Ok((url, json))
            });
            match part {
                Ok(part) => parts.push(Some(part)),
                Err(why) => {
                    parts.push(None);
                    replies[i] = Some(Reply::Rejected(why));
                }
            }
        }
        // Destinations in order of first appearance, with their events' indexes.
        let mut groups: Vec<(&Url, Vec<usize>)> = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            let Some((url, _)) = part else { continue };
            match groups.iter_mut().find(|(u, _)| *u == url) {
                Some((_, members)) => members.push(i),
                None => groups.push((url, vec![i])),
            }
        }
        let request = |url: &Url, members: &[usize]| -> Result<Request, String> {
            let mut body = vec![b'['];
            for (n, &i) in members.iter().enumerate() {
                if n > 0 {
                    body.push(b',');
                }
                if let Some((_, json)) = &parts[i] {
                    body.extend_from_slice(json);
                }
            }
            body.push(b']');
            Ok(Request {
                url: url.clone(),
                id: batch_id(members.iter().map(|&i| events[i].id.as_str())),
                content_type: BATCH_CONTENT_TYPE.to_string(),
                headers: Vec::new(),
                body,
            })
        };
        let requests: Vec<Result<Request, String>> = groups
            .iter()
            .map(|(url, members)| request(url, members))
            .collect();
        let mut alone = Vec::new();
        let sent = self.send_all(requests.len(), &|i| requests[i].clone());
        for ((_, members), reply) in groups.iter().zip(sent) {
            if matches!(reply, Reply::Rejected(_)) && members.len() > 1 {
                alone.extend(members.iter().copied());
                continue;
            }
            for &i in members {
                replies[i] = Some(reply.clone());
            }
        }
        if !alone.is_empty() {
            let requests: Vec<Result<Request, String>> = alone
                .iter()
                .filter_map(|&i| parts[i].as_ref().map(|(url, _)| request(url, &[i])))
                .collect();
            let sent = self.send_all(requests.len(), &|i| requests[i].clone());
            for (&i, reply) in alone.iter().zip(sent) {
                replies[i] = Some(reply);
            }
        }
        replies
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Reply::Outage("not sent".into())))
            .collect()
    }
}

/// A batched request's `webhook-id`: its one event's id, or the first's and the last's with
/// the count (`<first>..<last>+<n>`): the same events in the same batch make the same id.
fn batch_id<'a>(mut ids: impl ExactSizeIterator<Item = &'a str>) -> String {
    let n = ids.len();
    let first = ids.next().unwrap_or_default().to_string();
    match ids.last() {
        None => first,
        Some(last) => format!("{first}..{last}+{n}"),
    }
}

/// `v1,` and the base64 HMAC-SHA256 of `id.timestamp.body` under `key` (Standard Webhooks).
pub fn signature(key: &[u8], id: &str, timestamp: &str, body: &[u8]) -> String {
    // HMAC takes a key of any length.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return String::new();
    };
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

/// How `url`, the configured `base` with perhaps the event's stream segment added, shows in
/// logs, `last_error` and status: scheme, host, port, `/…` for the configured path (which may
/// hold a token), then the stream segment. The configured URL has no credentials by then.
fn shown(base: &Url, url: &Url) -> String {
    let mut shown = format!("{}://{}", url.scheme(), url.host_str().unwrap_or_default());
    if let Some(port) = url.port() {
        shown.push_str(&format!(":{port}"));
    }
    let base_path = base.path().trim_end_matches('/');
    if !base_path.is_empty() {
        shown.push_str("/…");
    }
    let added = url
        .path()
        .strip_prefix(base_path)
        .map(|rest| rest.trim_start_matches('/'))
        .unwrap_or_default();
    if url.path() != base.path() && !added.is_empty() {
        shown.push('/');
        shown.push_str(added);
    }
    shown
}

/// What the receiver's status says.
fn classify(status: u16, body: &[u8], url: &str) -> Reply {
    let quoted = || {
        let text = String::from_utf8_lossy(body);
        let text: String = text
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(QUOTED_BODY)
            .collect();
        let text = text.trim();
        if text.is_empty() {
            String::new()
        } else {
            format!(": {text}")
        }
    };
    match status {
        200..=299 => Reply::Delivered,
        408 | 429 | 500..=599 => Reply::Outage(format!("POST {url}: HTTP {status}{}", quoted())),
        413 => Reply::Rejected(format!(
            "POST {url}: HTTP 413, the event is too large for the receiver{}",
            quoted()
        )),
        300..=399 => Reply::Misconfigured(format!(
            "option \"url\": POST {url}: HTTP {status}, a redirect (not followed: the URL should be the endpoint itself)"
        )),
        _ => Reply::Rejected(format!("POST {url}: HTTP {status}{}", quoted())),
    }
}

impl Sender {
    /// Delivers `events`: one outcome per event, or an error for the whole batch.
    fn publish_all(&self, events: &[OutboxEvent]) -> Result<Vec<Outcome>, BatchError> {
        let replies = if self.config.mode == HttpMode::Batched {
            self.publish_batched(events)
        } else {
            self.send_all(events.len(), &|i| self.single(&events[i]))
        };
        // A redirect: the url option is wrong. The whole batch's error, so that the log says
        // so, unless other requests delivered events, which stay delivered.
        let delivered = replies.iter().any(|r| matches!(r, Reply::Delivered));
        if let Some(Reply::Misconfigured(why)) = replies
            .iter()
            .find(|r| matches!(r, Reply::Misconfigured(_)))
        {
            if !delivered {
                return Err(BatchError::Misconfigured(why.clone()));
            }
        }
        // Nothing delivered and the receiver unreachable: an outage of the whole batch, as the
        // relay logs and shows it in health.
        if let Some(Reply::Outage(why)) = replies.iter().find(|r| matches!(r, Reply::Outage(_))) {
            if !delivered {
                return Err(BatchError::Unavailable(why.clone()));
            }
        }
        Ok(replies
            .into_iter()
            .map(|reply| match reply {
                Reply::Delivered => Outcome::Delivered,
                Reply::Rejected(why) => Outcome::Rejected(why),
                Reply::Outage(why) | Reply::Misconfigured(why) => Outcome::Deferred(why),
            })
            .collect())
    }

    /// The receiver accepts connections (TCP, within `network_timeout`): a webhook has no
    /// standard request that changes nothing.
    fn health(&self) -> Result<(), BatchError> {
        let url = &self.config.url;
        let unavailable = |why: String| BatchError::Unavailable(format!("{}: {why}", self.shown));
        let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
            return Err(unavailable("no host".into()));
        };
        // Resolved on a thread of its own: the system's resolver takes no timeout.
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let (found, resolved) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = found.send((host.as_str(), port).to_socket_addrs().map(Vec::from_iter));
        });
        let addresses = match resolved.recv_timeout(self.config.timeout) {
            Ok(Ok(addresses)) => addresses,
            Ok(Err(e)) => return Err(unavailable(e.to_string())),
            Err(_) => return Err(unavailable("resolving the host timed out".into())),
        };
        let mut last = String::from("no address");
        for address in addresses {
            match TcpStream::connect_timeout(&address, self.config.timeout) {
                Ok(_) => return Ok(()),
                Err(e) => last = e.to_string(),
            }
        }
        Err(unavailable(last))
    }
}

impl PublisherBackend for WebhookBackend {
    fn name(&self) -> &'static str {
        "webhook"
    }

    fn publish(&mut self, events: &[OutboxEvent]) -> Result<Vec<Outcome>, BatchError> {
        self.sender.publish_all(events)
    }

    fn health_check(&mut self) -> Result<(), BatchError> {
        self.sender.health()
    }

    fn pipelined(&mut self) -> Option<&mut dyn Pipelined> {
        Some(self)
    }
}

/// The relay claims the next batch while this one is being sent.
impl Pipelined for WebhookBackend {
    fn send(&mut self, events: &Arc<Vec<OutboxEvent>>) -> Result<(), BatchError> {
        let (sender, events) = (Arc::clone(&self.sender), Arc::clone(events));
        // Started with the relay's signals held, as every thread of a backend.
        let thread = std::thread::Builder::new()
            .name("broadcaster webhook".into())
            .spawn(move || sender.publish_all(&events))
            .map_err(|e| BatchError::Unavailable(format!("starting a sending thread: {e}")))?;
        self.in_flight = Some(thread);
        Ok(())
    }

    fn receive(&mut self) -> Result<Vec<Outcome>, BatchError> {
        let thread = self
            .in_flight
            .take()
            .ok_or_else(|| BatchError::Unavailable("no batch was sent".into()))?;
        thread
            .join()
            .unwrap_or_else(|_| Err(BatchError::Unavailable("the sending thread failed".into())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Kind;

    fn config(pairs: &[(&str, &str)]) -> Result<WebhookConfig, ConfigError> {
        WebhookConfig::from_options(&crate::backend::test_options(None, pairs))
    }

    #[test]
    fn options_say_what_is_wrong() {
        assert!(config(&[]).is_err());
        // CREATE SERVER may leave the URL to a user mapping.
        assert!(WebhookConfig::from_options(&Options::default()).is_ok());
        let err = config(&[("url", "ftp://h/x")]).expect_err("refused");
        assert!(err.to_string().contains("ftp://"), "{err}");
        let err = config(&[("url", "https://u:s3cret@h/x?y=1")]).expect_err("refused");
        assert!(!err.to_string().contains("s3cret"), "{err}");
        assert!(config(&[("url", "http://h"), ("message_mode", "grouped")]).is_err());
        assert!(config(&[("url", "http://h"), ("connections", "0")]).is_err());
        assert!(config(&[("url", "http://h"), ("secret", "s3cret")]).is_err());
        assert!(config(&[("url", "http://h"), ("stream", "..")]).is_err());
        assert!(config(&[("url", "http://h"), ("tls_cert_file", "/c.pem")]).is_err());
        let kind = Kind::find("webhook").expect("registered");
        assert!(kind.secrets.contains(&"secret") && !kind.options.contains(&"secret"));
    }

    #[test]
    fn credentials_become_basic_authentication_and_leave_the_url() {
        let c = config(&[("url", "https://relay:p%40ss@h:8443/in/")]).expect("valid");
        assert_eq!(c.url.as_str(), "https://h:8443/in/");
        // base64("relay:p@ss")
        assert_eq!(c.authorization.as_deref(), Some("Basic cmVsYXk6cEBzcw=="));
    }

    #[test]
    fn streams_are_one_percent_encoded_path_segment() {
        let backend = WebhookBackend::new(
            config(&[("url", "http://h/in/"), ("stream_prefix", "or")]).expect("valid"),
        )
        .expect("backend");
        let event = |stream: Option<&str>| OutboxEvent {
            stream: stream.map(Into::into),
            ..Default::default()
        };
        assert_eq!(
            backend
                .sender
                .destination(&event(Some("orders/eu")))
                .map(String::from),
            Ok("http://h/in/orders%2Feu".to_string())
        );
        assert_eq!(
            backend.sender.destination(&event(None)).map(String::from),
            Ok("http://h/in/".to_string())
        );
        assert!(backend
            .sender
            .destination(&event(Some("payments")))
            .is_err());
    }

    #[test]
    fn urls_show_without_their_path() {
        let base = Url::parse("https://hooks.slack.com/services/T0/B0/tok3n").unwrap();
        let mut with_stream = base.clone();
        with_stream.path_segments_mut().unwrap().push("orders");
        assert_eq!(shown(&base, &base), "https://hooks.slack.com/…");
        assert_eq!(
            shown(&base, &with_stream),
            "https://hooks.slack.com/…/orders"
        );
        let root = Url::parse("http://127.0.0.1:8080/").unwrap();
        let mut with_stream = root.clone();
        with_stream
            .path_segments_mut()
            .unwrap()
            .pop_if_empty()
            .push("a/b");
        assert_eq!(shown(&root, &root), "http://127.0.0.1:8080");
        assert_eq!(shown(&root, &with_stream), "http://127.0.0.1:8080/a%2Fb");
    }

    #[test]
    fn signatures_match_the_standard_webhooks_example() {
        // The example of the Standard Webhooks specification's reference libraries.
        let key = signing_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("key");
        assert_eq!(
            signature(
                &key,
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                "1614265330",
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn replies_are_outages_or_the_events_fault() {
        assert!(matches!(classify(204, b"", "u"), Reply::Delivered));
        for status in [408, 429, 500, 503] {
            assert!(
                matches!(classify(status, b"", "u"), Reply::Outage(_)),
                "{status}"
            );
        }
        assert!(matches!(classify(301, b"", "u"), Reply::Misconfigured(_)));
        for status in [400, 404, 413, 422] {
            assert!(
                matches!(classify(status, b"", "u"), Reply::Rejected(_)),
                "{status}"
            );
        }
        let Reply::Rejected(why) = classify(422, b"bad\n field \"x\"", "u") else {
            panic!("a rejection");
        };
        assert_eq!(why, "POST u: HTTP 422: bad  field \"x\"");
    }
}
