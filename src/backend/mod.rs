//! Where events go: the [`PublisherBackend`] contract, the options a backend is configured with,
//! and the registry of backend kinds. Plain Rust: backends never touch Postgres.
//!
//! Adding a backend: one file (or folder) here with a type implementing [`PublisherBackend`]
//! and [`Backend`], and one line in [`REGISTRY`]. The relay owns everything around a send: the
//! claim, retries and backoff, the rule that holds a partition key's later events behind a
//! failed one, and any overlap of the next claim with the current send.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::event::OutboxEvent;

pub mod amqp;
pub mod binding;
pub mod file;
pub mod kafka;
pub mod mqtt;
pub mod nats;
pub mod order;
pub mod redis;
pub mod webhook;

/// Every kind of backend a server (or `broadcaster.backend`) can name, by name.
pub const REGISTRY: &[Kind] = &[
    kind::<redis::RedisStreamBackend>("redis"),
    kind::<file::FileBackend>("file"),
    kind::<webhook::WebhookBackend>("webhook"),
    kind::<nats::NatsBackend>("nats"),
    kind::<mqtt::MqttBackend>("mqtt"),
    kind::<amqp::AmqpBackend>("amqp"),
    kind::<kafka::KafkaBackend>("kafka"),
];

/// What became of one event of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The broker has it.
    Delivered,
    /// The broker (or the backend) refused this event: it counts as a failed attempt, is
    /// retried with its own backoff, and becomes dead after `broadcaster.max_attempts`.
    Rejected(String),
    /// Not delivered, not the event's fault (the broker went away mid-batch): it stays pending,
    /// no attempt counted, and the relay backs off as for an outage.
    Deferred(String),
    /// Not attempted (e.g. held behind an earlier failure of its key inside the broker's
    /// transaction): it stays pending, untouched.
    NotSent,
}

impl Outcome {
    /// A rejection for an event that does not make a valid message.
    pub fn invalid(e: impl std::fmt::Display) -> Outcome {
        Outcome::Rejected(e.to_string())
    }
}

/// Why a whole batch went nowhere. Nothing is counted against its events.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// The broker can't be reached or isn't serving: the relay keeps the events pending and
    /// retries with backoff.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The backend's configuration is wrong (a server's options, or `broadcaster.*`): the relay
    /// rebuilds the backend after its backoff, so that a fix (`ALTER SERVER`, reload) is seen.
    #[error("backend misconfigured: {0}")]
    Misconfigured(String),
}

/// A destination for committed events: the one thing a backend author writes.
///
/// The relay calls [`publish`](Self::publish) with up to `broadcaster.batch_size` events in
/// `seq` order and expects one [`Outcome`] per event, in the same order. Unless
/// [`keeps_key_order`](Self::keeps_key_order) says otherwise, no partition key appears twice in
/// one batch, so a backend may send the events in any order, at once or one by one; the relay
/// holds a key's later events itself once one of them fails. Every network call must have a
/// timeout: the relay waits for `publish` to return.
pub trait PublisherBackend {
    /// The backend's kind, for logs and errors (`redis`, `file`).
    fn name(&self) -> &'static str;

    /// Delivers `events`: one outcome per event, in order, or an error for the whole batch.
    fn publish(&mut self, events: &[OutboxEvent]) -> Result<Vec<Outcome>, BatchError>;

    /// A cheap check that the broker is reachable and serving; the relay calls it while idle,
    /// so that `broadcaster_health()` stays truthful.
    fn health_check(&mut self) -> Result<(), BatchError>;

    /// True when this backend delivers a batch so that, once an event of a partition key fails,
    /// none of the key's later events in the batch lands (one broker transaction, say), and
    /// answers those [`Outcome::NotSent`]. The relay then gives it batches in which keys repeat.
    /// False (the default): the relay never puts two events of one key in a batch.
    fn keeps_key_order(&self) -> bool {
        false
    }

    /// What this backend found wrong with its broker that is not an outage: events flow, but
    /// the broker may lose them (a Redis memory policy that evicts streams, say). The relay
    /// logs it once when it appears and shows it in `broadcaster_status.warning`. None (the
    /// default): nothing.
    fn warning(&self) -> Option<String> {
        None
    }

    /// The same backend, if it can send a batch and read the broker's replies in two steps.
    /// The relay then claims the next batch while the broker works on this one.
    fn pipelined(&mut self) -> Option<&mut dyn Pipelined> {
        None
    }
}

/// A backend that sends a batch and reads the broker's replies separately. The relay calls
/// [`send`](Self::send), then [`receive`](Self::receive) for the same batch, never two sends in
/// a row; in between it may claim the next batch and [`prepare`](Self::prepare) it.
pub trait Pipelined {
    /// Sends `events` without waiting for replies.
    fn send(&mut self, events: &Arc<Vec<OutboxEvent>>) -> Result<(), BatchError>;

    /// The outcomes of the batch sent last, one per event.
    fn receive(&mut self) -> Result<Vec<Outcome>, BatchError>;

    /// `next` is the batch to be sent after the current one: a backend may start encoding it
    /// (on a thread of its own, never calling Postgres). The default does nothing.
    fn prepare(&mut self, next: &Arc<Vec<OutboxEvent>>) {
        let _ = next;
    }
}

/// A backend kind's constructor, from its typed configuration.
pub trait Backend: PublisherBackend + Sized + 'static {
    /// The backend's own configuration, read from options.
    type Config: Config;

    /// A backend for `config`. Connecting may wait: it is done at the first publish.
    fn new(config: Self::Config) -> Result<Self, BatchError>;
}

/// A backend's typed configuration.
pub trait Config: Sized {
    /// Option names a server may set (`CREATE SERVER ... OPTIONS (name 'value')`).
    const OPTIONS: &'static [&'static str];
    /// Option names that may hold a secret: also allowed in a `USER MAPPING`, never logged.
    /// A name here but not in [`OPTIONS`](Self::OPTIONS) is a secret through and through (a
    /// signing key): allowed only in a user mapping, since every role reads a server's options.
    const SECRETS: &'static [&'static str] = &[];
    /// Whether only a superuser may create a server of this kind: it acts on the server's host
    /// with the relay's rights (writes files, runs functions).
    const SUPERUSER_ONLY: bool = false;
    /// Option names only a superuser may set: they make the relay read files of the server's
    /// host (a TLS key, say), as the settings they mirror are superuser-only.
    const SUPERUSER_OPTIONS: &'static [&'static str] = &[];

    /// The configuration from `options`, or what is wrong with them. Reads no file and opens
    /// no connection: the validator calls it at `CREATE SERVER`.
    fn from_options(options: &Options) -> Result<Self, ConfigError>;
}

/// Bad options: unknown names, or a value that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("unknown backend \"{0}\"; known backends: {known}", known = known_kinds())]
    UnknownBackend(String),
    #[error("invalid option \"{name}\"; valid options here: {valid}")]
    UnknownOption { name: String, valid: String },
    #[error("invalid value for option \"{name}\": {why}")]
    InvalidValue { name: String, why: String },
    #[error("a {kind} server can be created or changed only by a superuser: the relay runs it with its own rights")]
    SuperuserOnly { kind: &'static str },
    #[error(
        "only a superuser may set option \"{name}\": the relay reads that file with its own rights"
    )]
    SuperuserOption { name: String },
}

impl ConfigError {
    /// A value of option `name` that is wrong, and why.
    pub fn invalid(name: &str, why: impl Into<String>) -> ConfigError {
        ConfigError::InvalidValue {
            name: name.to_string(),
            why: why.into(),
        }
    }
}

/// Checks the TLS file options as a backend read them (`tls_ca_file`, `tls_cert_file`,
/// `tls_key_file`; empty when unset): the certificate and its key go together, and, when
/// `plain` names the scheme that asks for TLS (the URL asks for none), none may be set. No
/// file is read here: the relay reads them when it connects.
pub fn check_tls_files(
    ca: &str,
    cert: &str,
    key: &str,
    plain: Option<&str>,
) -> Result<(), ConfigError> {
    if cert.is_empty() != key.is_empty() {
        return Err(ConfigError::invalid(
            "tls_cert_file",
            "tls_cert_file and tls_key_file go together: set both, or neither",
        ));
    }
    match plain {
        Some(scheme) if !ca.is_empty() || !cert.is_empty() => Err(ConfigError::invalid(
            "url",
            format!("tls_ca_file, tls_cert_file and tls_key_file are for TLS: use {scheme}"),
        )),
        _ => Ok(()),
    }
}

/// The TLS files a backend's options name, read when the relay connects (never at
/// `CREATE SERVER`: the files are the relay's, on the database server's machine).
#[derive(Default)]
pub struct TlsFiles {
    /// `tls_ca_file`'s bytes (PEM): the CA certificates to trust instead of the system's.
    pub ca: Option<Vec<u8>>,
    /// `tls_cert_file`'s and `tls_key_file`'s bytes (PEM): the client certificate and its key.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl TlsFiles {
    /// Reads the files of `tls_ca_file`, `tls_cert_file` and `tls_key_file` (empty when unset;
    /// [`check_tls_files`] made sure the certificate and its key go together). A file that
    /// can't be read is [`BatchError::Misconfigured`], naming the option and the path.
    pub fn read(ca: &str, cert: &str, key: &str) -> Result<TlsFiles, BatchError> {
        let read = |option: &str, path: &str| {
            std::fs::read(path).map_err(|e| {
                BatchError::Misconfigured(format!("option \"{option}\": reading {path}: {e}"))
            })
        };
        Ok(TlsFiles {
            ca: match ca {
                "" => None,
                path => Some(read("tls_ca_file", path)?),
            },
            identity: match (cert, key) {
                ("", _) | (_, "") => None,
                (cert, key) => Some((read("tls_cert_file", cert)?, read("tls_key_file", key)?)),
            },
        })
    }
}

impl BatchError {
    /// What went wrong, without the kind's words ("broker unavailable: ").
    pub fn reason(&self) -> &str {
        match self {
            BatchError::Unavailable(why) | BatchError::Misconfigured(why) => why,
        }
    }
}

impl From<ConfigError> for BatchError {
    fn from(e: ConfigError) -> Self {
        BatchError::Misconfigured(e.to_string())
    }
}

/// One backend kind in the [`REGISTRY`].
pub struct Kind {
    pub name: &'static str,
    pub options: &'static [&'static str],
    pub secrets: &'static [&'static str],
    pub superuser_only: bool,
    pub superuser_options: &'static [&'static str],
    validate: fn(&Options) -> Result<(), ConfigError>,
    build: fn(&Options) -> Result<Box<dyn PublisherBackend>, BatchError>,
}

/// The registry entry of `B`, known as `name`.
pub const fn kind<B: Backend>(name: &'static str) -> Kind {
    Kind {
        name,
        options: B::Config::OPTIONS,
        secrets: B::Config::SECRETS,
        superuser_only: B::Config::SUPERUSER_ONLY,
        superuser_options: B::Config::SUPERUSER_OPTIONS,
        validate: validate::<B>,
        build: build_kind::<B>,
    }
}

fn validate<B: Backend>(options: &Options) -> Result<(), ConfigError> {
    B::Config::from_options(options).map(drop)
}

fn build_kind<B: Backend>(options: &Options) -> Result<Box<dyn PublisherBackend>, BatchError> {
    let config = B::Config::from_options(options)?;
    Ok(Box::new(B::new(config)?))
}

impl Kind {
    /// The kind named `name`.
    pub fn find(name: &str) -> Result<&'static Kind, ConfigError> {
        REGISTRY
            .iter()
            .find(|k| k.name == name)
            .ok_or_else(|| ConfigError::UnknownBackend(name.to_string()))
    }

    /// Checks `options` without connecting anywhere.
    pub fn validate(&self, options: &Options) -> Result<(), ConfigError> {
        (self.validate)(options)
    }

    /// A backend configured by `options`.
    pub fn build(&self, options: &Options) -> Result<Box<dyn PublisherBackend>, BatchError> {
        (self.build)(options)
    }
}

/// The registry's kinds, for messages: `redis, file`.
pub fn known_kinds() -> String {
    REGISTRY
        .iter()
        .map(|k| k.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Options a backend is configured with: a server's options (with its user mapping's), or the
/// `broadcaster.*` settings for the default backend, as name/value text; plus what the relay
/// knows of where it runs.
#[derive(Clone, Default)]
pub struct Options {
    values: HashMap<String, String>,
    /// Set by the relay, never by a user.
    pub context: Context,
    /// What the user calls an option when it is not its own name (the default backend's
    /// options are `broadcaster.*` settings): `(option, label)` pairs.
    pub labels: &'static [(&'static str, &'static str)],
}

/// What the relay tells every backend about where it runs.
#[derive(Clone, Debug)]
pub struct Context {
    /// The server's name; None for the default backend.
    pub server: Option<String>,
    /// The database whose outbox is relayed; empty while validating.
    pub database: String,
    /// The cluster's system identifier ([`crate::pg::system_identifier`]); 0 while
    /// validating. Tells apart relays of same-named databases in different clusters.
    pub cluster: u64,
    /// `broadcaster.network_timeout`: the bound on every network operation unless a server
    /// sets its own.
    pub timeout: Duration,
    /// `broadcaster.max_event_size`: larger encoded events are rejected; 0 for no limit.
    pub max_event_size: usize,
}

impl Default for Context {
    fn default() -> Self {
        Context {
            server: None,
            database: String::new(),
            cluster: 0,
            timeout: Duration::from_secs(2),
            max_event_size: 0,
        }
    }
}

impl Context {
    /// A name for this relay that brokers which de-duplicate per producer can key on (Redis
    /// `XADD IDMP`): `broadcaster:<database>[:<server>]`.
    pub fn producer_id(&self) -> String {
        match &self.server {
            Some(server) => format!("broadcaster:{}:{server}", self.database),
            None => format!("broadcaster:{}", self.database),
        }
    }
}

/// Options from `pairs` as the relay of database `db` in cluster `7441_0b2c` (hex) would give
/// them to server `server` (None: the default backend): what backends' unit tests configure.
#[cfg(test)]
pub fn test_options(server: Option<&str>, pairs: &[(&str, &str)]) -> Options {
    Options::new(pairs.iter().copied()).with_context(Context {
        server: server.map(str::to_string),
        database: "db".into(),
        cluster: 0x7441_0b2c,
        ..Default::default()
    })
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<&String> = self.values.keys().collect();
        names.sort();
        f.debug_struct("Options")
            .field("names", &names)
            .field("context", &self.context)
            .finish()
    }
}

impl Options {
    /// Options from name/value pairs; a later pair overrides an earlier one of the same name.
    pub fn new<K: Into<String>, V: Into<String>>(pairs: impl IntoIterator<Item = (K, V)>) -> Self {
        Options {
            values: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            context: Context::default(),
            labels: &[],
        }
    }

    /// How errors name the option `name`: its setting for the default backend.
    pub fn label(&self, name: &str) -> String {
        self.labels
            .iter()
            .find(|(option, _)| *option == name)
            .map_or(name, |(_, label)| label)
            .to_string()
    }

    /// With `context`.
    pub fn with_context(mut self, context: Context) -> Self {
        self.context = context;
        self
    }

    /// Adds or replaces one option.
    pub fn set(&mut self, name: &str, value: impl Into<String>) {
        self.values.insert(name.to_string(), value.into());
    }

    /// The names set.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.values.keys().map(String::as_str)
    }

    /// The value of `name`, if set.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    /// The value of `name`, or `default`.
    pub fn text(&self, name: &str, default: &str) -> String {
        self.get(name).unwrap_or(default).to_string()
    }

    /// The value of `name` parsed as `T`, or `default` when unset.
    pub fn parse<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T, ConfigError>
    where
        T::Err: std::fmt::Display,
    {
        match self.get(name) {
            None => Ok(default),
            Some(text) => text
                .trim()
                .parse()
                .map_err(|e: T::Err| ConfigError::InvalidValue {
                    name: self.label(name),
                    why: format!("{text:?}: {e}"),
                }),
        }
    }

    /// A duration given in milliseconds, or the relay's network timeout when unset.
    pub fn timeout(&self, name: &str) -> Result<Duration, ConfigError> {
        match self.get(name) {
            None => Ok(self.context.timeout),
            Some(_) => {
                let ms: u64 = self.parse(name, 0)?;
                if ms == 0 {
                    return Err(ConfigError::InvalidValue {
                        name: self.label(name),
                        why: "must be at least 1 (milliseconds)".into(),
                    });
                }
                Ok(Duration::from_millis(ms))
            }
        }
    }

    /// The `message_mode` option: `binary` (the default) or `structured`.
    pub fn message_mode(&self) -> Result<binding::Mode, ConfigError> {
        match self.get("message_mode").unwrap_or("binary") {
            "binary" => Ok(binding::Mode::Binary),
            "structured" => Ok(binding::Mode::Structured),
            other => Err(ConfigError::invalid(
                &self.label("message_mode"),
                format!("{other:?}; expected binary or structured"),
            )),
        }
    }

    /// Refuses any name outside `allowed`.
    pub fn only(&self, allowed: &[&str]) -> Result<(), ConfigError> {
        let mut names: Vec<&str> = self.names().collect();
        names.sort_unstable();
        match names.into_iter().find(|n| !allowed.contains(n)) {
            None => Ok(()),
            Some(name) => Err(ConfigError::UnknownOption {
                name: name.to_string(),
                valid: allowed.join(", "),
            }),
        }
    }
}

/// Whether `value` (a URL) carries a secret: a password, `scheme://user:password@host`; or,
/// for every scheme but Redis's, any user information, since a bare one is a token there
/// (`nats://token@host`, `https://token@host` sent as Basic authentication, an MQTT token as
/// user name). A Redis URL's bare user name is an ACL user, no secret.
pub fn has_password(value: &str) -> bool {
    split_urls(value).into_iter().any(|url| {
        let Some((scheme, rest)) = url.split_once("://") else {
            return false;
        };
        let token = !scheme.starts_with("redis");
        // The user information ends at the last `@` (a password may hold `/` or `@`).
        match rest.rsplit_once('@') {
            None => false,
            Some((userinfo, _)) if userinfo.contains(':') => true,
            // A `/` before the `@`: the `@` is in the path.
            Some((userinfo, _)) => token && !userinfo.contains('/'),
        }
    })
}

/// The URLs in an option that may hold several (a Redis Cluster's seeds): split at each comma
/// that starts another `scheme://`, so that a comma inside a password or a sentinel URL's list
/// of hosts stays where it is.
pub fn split_urls(value: &str) -> Vec<&str> {
    let mut urls = Vec::new();
    let mut start = 0;
    for (i, _) in value.match_indices(',') {
        let next = value[i + 1..].trim_start();
        let scheme = next.split("://").next().unwrap_or_default();
        let starts_url = next.contains("://")
            && !scheme.is_empty()
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        if i >= start && starts_url {
            urls.push(value[start..i].trim());
            start = i + 1;
        }
    }
    urls.push(value[start..].trim());
    urls.retain(|u| !u.is_empty());
    urls
}

/// A Tokio runtime for a backend whose broker client is asynchronous: one worker thread, so
/// that the client's connection (pings, reconnects) is served between batches too. Built in
/// [`Backend::new`], which the relay calls with Postgres's signals held: the thread inherits
/// that mask, so signals keep going to the relay's own thread. It never calls Postgres.
pub fn runtime(kind: &str) -> Result<tokio::runtime::Runtime, BatchError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(format!("broadcaster {kind}"))
        .enable_all()
        .build()
        .map_err(|e| BatchError::Unavailable(format!("starting the {kind} client's runtime: {e}")))
}

/// The option that names a server's backend kind.
pub const KIND_OPTION: &str = "backend";

/// `events` cut, in order, into runs in which no partition key appears twice: the batches the
/// relay hands a backend that does not keep key order ([`PublisherBackend::keeps_key_order`]).
pub fn key_runs(events: &[OutboxEvent]) -> Vec<std::ops::Range<usize>> {
    let mut runs = Vec::new();
    let mut start = 0;
    let mut keys: std::collections::HashSet<&str> = std::collections::HashSet::new();
    for (i, event) in events.iter().enumerate() {
        if let Some(key) = event.partition_key.as_deref() {
            if !keys.insert(key) {
                runs.push(start..i);
                start = i;
                keys.clear();
                keys.insert(key);
            }
        }
    }
    if start < events.len() {
        runs.push(start..events.len());
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_backend_lists_the_known_ones() {
        let err = Kind::find("pulsar")
            .err()
            .expect("unknown backend is refused");
        let msg = err.to_string();
        assert!(msg.contains("\"pulsar\""), "{msg}");
        assert!(
            msg.contains("redis, file, webhook, nats, mqtt, amqp, kafka"),
            "{msg}"
        );
    }

    #[test]
    fn debug_never_shows_option_values() {
        let options = Options::new([("url", "redis://user:s3cret@localhost")]);
        let shown = format!("{options:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("url"), "{shown}");
    }

    #[test]
    fn unknown_options_are_named_with_the_valid_ones() {
        let err = Options::new([("stream", "a"), ("colour", "red")])
            .only(&["stream", "url"])
            .expect_err("refused");
        assert_eq!(
            err.to_string(),
            "invalid option \"colour\"; valid options here: stream, url"
        );
    }

    #[test]
    fn values_parse_or_say_why() {
        let options = Options::new([("maxlen", "ten")]);
        let err = options.parse::<u64>("maxlen", 0).expect_err("refused");
        assert!(err.to_string().contains("\"maxlen\""), "{err}");
        assert_eq!(options.parse::<u64>("other", 7), Ok(7));
        assert!(Options::new([("t", "0")]).timeout("t").is_err());
    }

    fn keyed(k: Option<&str>) -> OutboxEvent {
        OutboxEvent {
            partition_key: k.map(Into::into),
            ..Default::default()
        }
    }

    #[test]
    fn passwords_in_urls_are_seen() {
        assert!(has_password("redis://:s3cret@host:6379/0"));
        assert!(has_password("rediss://user:s3cret@host"));
        assert!(!has_password("redis://user@host"));
        assert!(has_password("nats://s3cret-token@host:4222"));
        assert!(has_password("https://s3cret-token@hooks.example.com/in"));
        assert!(has_password("mqtts://s3cret-token@broker"));
        assert!(!has_password("https://hooks.example.com/in/a@b"));
        assert!(!has_password("redis://host:6379"));
        assert!(!has_password("not a url"));
        // A cluster's seeds, and a sentinel URL's hosts.
        assert!(has_password("redis://a:7000,redis://:s3cret@b:7001"));
        assert!(!has_password("redis://a:7000,redis://b:7001"));
        assert!(has_password(
            "redis+sentinel://relay:s3cret@h1:26379,h2:26379/main"
        ));
        assert!(!has_password("redis+sentinel://h1:26379,h2:26379/main"));
        // A comma or a slash in a password.
        assert!(has_password("redis://:p,w@h:6379"));
        assert!(has_password("redis+sentinel://u:pa/ss@h:1/m"));
        assert_eq!(
            split_urls("redis://a:1, redis://:p,w@b:2,rediss://c"),
            vec!["redis://a:1", "redis://:p,w@b:2", "rediss://c"]
        );
        assert_eq!(
            split_urls("redis+sentinel://h1:1,h2:2/m"),
            vec!["redis+sentinel://h1:1,h2:2/m"]
        );
    }

    #[test]
    fn key_runs_never_repeat_a_key() {
        let events: Vec<OutboxEvent> = [Some("a"), Some("b"), None, Some("a"), None, Some("c")]
            .into_iter()
            .map(keyed)
            .collect();
        assert_eq!(key_runs(&events), vec![0..3, 3..6]);
        let one_key: Vec<OutboxEvent> = (0..3).map(|_| keyed(Some("k"))).collect();
        assert_eq!(key_runs(&one_key), vec![0..1, 1..2, 2..3]);
        assert!(key_runs(&[]).is_empty());
    }
}
