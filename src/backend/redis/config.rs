//! The Redis backend's options: `CREATE SERVER ... OPTIONS (backend 'redis', url '...', ...)`,
//! or the `broadcaster.*` settings for the default backend.

use std::time::Duration;

use redis::{Client, RedisError};

use crate::backend::binding::Mode;
use crate::backend::{Config, ConfigError, Options};

/// Most replicas `wait_replicas` may ask for: `broadcaster.redis_wait_replicas`'s bound too.
pub const MAX_WAIT_REPLICAS: u32 = 64;

/// A Redis backend's configuration.
#[derive(Clone)]
pub struct RedisConfig {
    /// `url`: `redis[s]://[user:password@]host[:port][/db]`, or several such URLs separated by
    /// commas: seed nodes of a Redis Cluster, tried in order (any one node's URL is enough;
    /// the relay finds the others). Secret: may hold a password; never logged, never shown in
    /// an error. May be set in a `USER MAPPING` instead.
    pub url: String,
    /// `tls_ca_file`: CA certificate (PEM file) for `rediss://`; empty: the system's.
    pub tls_ca_file: String,
    /// `tls_cert_file`, `tls_key_file`: client certificate and key (PEM) for mutual TLS.
    pub tls_cert_file: String,
    pub tls_key_file: String,
    /// `stream_prefix`: every stream written to starts with this; empty: any.
    pub stream_prefix: String,
    /// `stream`: the stream of events whose `stream` column is NULL. Default
    /// `broadcaster:<database>` (the default backend) or `broadcaster:<database>:<server>`.
    pub stream: String,
    /// `maxlen`: approximate `MAXLEN` for `XADD`; 0 leaves streams untrimmed.
    pub maxlen: u64,
    /// `message_mode`: `binary` (one field per attribute, `ce_id`, `ce_type`, ..., then
    /// `content-type` and `data`, as the CloudEvents Kafka binding's binary mode) or
    /// `structured` (one `cloudevent` field).
    pub mode: Mode,
    /// `network_timeout` (milliseconds): bound on every network operation; default
    /// `broadcaster.network_timeout`.
    pub timeout: Duration,
    /// `wait_replicas`: a batch counts as delivered only once this many replicas acknowledged
    /// it (`WAIT`); 0 (the default) counts Redis's own acknowledgement. Redis replicates
    /// asynchronously: without it, an entry acknowledged just before a failover can be lost.
    pub wait_replicas: u32,
    /// `wait_timeout` (milliseconds): how long `WAIT` waits for the replicas; a batch not
    /// acknowledged by then is sent again later (a duplicate with the same id). Default 1000.
    pub wait_timeout: Duration,
    /// `broadcaster.max_event_size`, in bytes; 0: no limit.
    pub max_event_size: usize,
    /// Names this relay to a server that de-duplicates (`XADD IDMP`).
    pub producer_id: String,
}

impl RedisConfig {
    /// The URLs in `url`: one, or a cluster's seed nodes ([`crate::backend::split_urls`]: a
    /// sentinel URL, which lists its sentinels with commas itself, is one).
    pub fn seed_urls(&self) -> Vec<&str> {
        crate::backend::split_urls(&self.url)
    }
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &"<hidden>")
            .field("stream", &self.stream)
            .field("stream_prefix", &self.stream_prefix)
            .field("maxlen", &self.maxlen)
            .field("mode", &self.mode)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379".into(),
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            stream_prefix: String::new(),
            stream: "events".into(),
            maxlen: 0,
            mode: Mode::Binary,
            timeout: Duration::from_secs(2),
            wait_replicas: 0,
            wait_timeout: Duration::from_secs(1),
            max_event_size: 0,
            producer_id: String::new(),
        }
    }
}

impl Config for RedisConfig {
    const OPTIONS: &'static [&'static str] = &[
        "url",
        "stream",
        "stream_prefix",
        "maxlen",
        "message_mode",
        "network_timeout",
        "wait_replicas",
        "wait_timeout",
        "tls_ca_file",
        "tls_cert_file",
        "tls_key_file",
    ];
    const SECRETS: &'static [&'static str] = &["url"];
    const SUPERUSER_OPTIONS: &'static [&'static str] =
        &["tls_ca_file", "tls_cert_file", "tls_key_file"];

    fn from_options(options: &Options) -> Result<Self, ConfigError> {
        let invalid = |name: &str, why: String| ConfigError::InvalidValue {
            name: options.label(name),
            why,
        };
        let context = &options.context;
        let default_stream = match &context.server {
            Some(server) => format!("broadcaster:{}:{server}", context.database),
            None => format!("broadcaster:{}", context.database),
        };
        let config = RedisConfig {
            url: options.text("url", "redis://127.0.0.1:6379"),
            tls_ca_file: options.text("tls_ca_file", ""),
            tls_cert_file: options.text("tls_cert_file", ""),
            tls_key_file: options.text("tls_key_file", ""),
            stream_prefix: options.text("stream_prefix", ""),
            stream: options.text("stream", &default_stream),
            maxlen: options.parse("maxlen", 0)?,
            mode: options.message_mode()?,
            timeout: options.timeout("network_timeout")?,
            wait_replicas: options.parse("wait_replicas", 0)?,
            wait_timeout: Duration::from_millis(options.parse("wait_timeout", 1000)?),
            max_event_size: context.max_event_size,
            producer_id: context.producer_id(),
        };
        // Parsing opens no connection. The error says what is wrong without the URL: it may
        // hold a password.
        if config.seed_urls().is_empty() {
            return Err(invalid("url", "no Redis URL given".into()));
        }
        let urls = config.seed_urls();
        for url in &urls {
            if let Some(parsed) = super::SentinelUrl::parse(url) {
                let parsed = parsed.map_err(|why| invalid("url", why))?;
                let tls_files = !(config.tls_ca_file.is_empty()
                    && config.tls_cert_file.is_empty()
                    && config.tls_key_file.is_empty());
                if tls_files && !parsed.tls {
                    return Err(invalid(
                        "url",
                        "tls_ca_file, tls_cert_file and tls_key_file are for TLS: use rediss+sentinel:// (TLS to the sentinels and the primary), or unset them".into(),
                    ));
                }
                continue;
            }
            Client::open(*url).map_err(|e: RedisError| {
                invalid(
                    "url",
                    format!(
                        "not a valid Redis URL ({:?}); expected redis[s]://[user:password@]host[:port][/db], or several separated by commas",
                        e.kind()
                    ),
                )
            })?;
        }
        if config.wait_replicas > MAX_WAIT_REPLICAS {
            return Err(invalid(
                "wait_replicas",
                format!(
                    "{} replicas; at most {MAX_WAIT_REPLICAS} (more than a primary has would stall every batch)",
                    config.wait_replicas
                ),
            ));
        }
        if config.wait_timeout.is_zero() {
            return Err(invalid(
                "wait_timeout",
                "0 would make WAIT wait forever; give milliseconds".into(),
            ));
        }
        if config.tls_cert_file.is_empty() != config.tls_key_file.is_empty() {
            return Err(invalid(
                "tls_cert_file",
                format!(
                    "{} and {} go together: set both, or neither",
                    options.label("tls_cert_file"),
                    options.label("tls_key_file")
                ),
            ));
        }
        if config.stream.is_empty() {
            return Err(invalid("stream", "the stream name is empty".into()));
        }
        crate::event::validate_stream(&config.stream, &config.stream_prefix)
            .map_err(|e| invalid("stream", e.to_string()))?;
        Ok(config)
    }
}
