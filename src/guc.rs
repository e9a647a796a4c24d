//! The `broadcaster.*` settings: one private static each, registered in `_PG_init`, read
//! through one typed accessor each.

use std::ffi::CString;
use std::time::Duration;

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting, PostgresGucEnum};

use crate::backend::{Context, Options};

#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum MessageModeSetting {
    #[name = c"binary"]
    Binary,
    #[name = c"structured"]
    Structured,
}

static DATABASE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"postgres"));
static BACKEND: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"redis"));
static REDIS_URL: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"redis://127.0.0.1:6379"));
static REDIS_TLS_CA_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static REDIS_TLS_CERT_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static REDIS_TLS_KEY_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static STREAM_PREFIX: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static STREAM: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static REDIS_MAXLEN: GucSetting<i32> = GucSetting::<i32>::new(0);
static REDIS_WAIT_REPLICAS: GucSetting<i32> = GucSetting::<i32>::new(0);
static REDIS_WAIT_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);
static MESSAGE_MODE: GucSetting<MessageModeSetting> =
    GucSetting::<MessageModeSetting>::new(MessageModeSetting::Binary);
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum OnDeadEvent {
    /// Later events of the dead event's partition key wait until it is requeued or discarded.
    #[name = c"hold"]
    Hold,
    /// Later events of the key flow on; the dead event is out of order if requeued.
    #[name = c"skip"]
    Skip,
}

static FILE_PATH: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static DEFAULT_SOURCE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(1000);
static POLL_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);
static NETWORK_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(2000);
static RETRY_MAX_DELAY_MS: GucSetting<i32> = GucSetting::<i32>::new(30_000);
static MAX_ATTEMPTS: GucSetting<i32> = GucSetting::<i32>::new(10);
static MAX_EVENT_SIZE: GucSetting<i32> = GucSetting::<i32>::new(1024 * 1024);
static ON_DEAD_EVENT: GucSetting<OnDeadEvent> = GucSetting::<OnDeadEvent>::new(OnDeadEvent::Hold);
static RETENTION_S: GucSetting<i32> = GucSetting::<i32>::new(0);
static HEALTH_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(5000);

pub fn register() {
    GucRegistry::define_string_guc(
        c"broadcaster.database",
        c"Databases whose outboxes are relayed: one name or a comma-separated list.",
        c"Each gets its own relay worker, started once the database exists; reload to change.",
        &DATABASE,
        GucContext::Sighup,
        GucFlags::empty(),
    );
    GucRegistry::define_string_guc(
        c"broadcaster.backend",
        c"Where events are published: redis or file.",
        c"",
        &BACKEND,
        GucContext::Sighup,
        GucFlags::empty(),
    );
    GucRegistry::define_string_guc(
        c"broadcaster.redis_url",
        c"Redis URL, redis://[user:password@]host[:port][/db].",
        c"May hold a password: visible to superusers only and never logged.",
        &REDIS_URL,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_string_guc(
        c"broadcaster.redis_tls_ca_file",
        c"PEM file of the certificate authority that signed the Redis server's certificate.",
        c"For rediss:// URLs; empty trusts the system's authorities.",
        &REDIS_TLS_CA_FILE,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_string_guc(
        c"broadcaster.redis_tls_cert_file",
        c"PEM file of the client certificate the relay presents to Redis (mutual TLS).",
        c"For rediss:// URLs, with broadcaster.redis_tls_key_file; empty: no client certificate.",
        &REDIS_TLS_CERT_FILE,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_string_guc(
        c"broadcaster.redis_tls_key_file",
        c"PEM file (PKCS#8) of the private key of broadcaster.redis_tls_cert_file.",
        c"Readable by the server's operating-system user only, like its own ssl_key_file.",
        &REDIS_TLS_KEY_FILE,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_string_guc(
        c"broadcaster.stream_prefix",
        c"Every stream the relay writes to must start with this; empty: any stream.",
        c"Confines the keys producers can name in the stream column: others are refused when written (SQLSTATE 42501). Pair it with a Redis ACL key pattern (~prefix*).",
        &STREAM_PREFIX,
        GucContext::Sighup,
        GucFlags::empty(),
    );
    GucRegistry::define_string_guc(
        c"broadcaster.stream",
        c"Redis stream for events whose stream column is NULL.",
        c"Empty means broadcaster:<database>.",
        &STREAM,
        GucContext::Sighup,
        GucFlags::empty(),
    );
    GucRegistry::define_int_guc(
        c"broadcaster.redis_maxlen",
        c"Approximate MAXLEN for XADD; 0 leaves streams untrimmed.",
        c"",
        &REDIS_MAXLEN,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::empty(),
    );
    GucRegistry::define_int_guc(
        c"broadcaster.redis_wait_replicas",
        c"A batch counts as delivered only once this many Redis replicas acknowledged it (WAIT).",
        c"0 counts the primary's acknowledgement alone: Redis replicates asynchronously, so an entry acknowledged just before a failover can be lost.",
        &REDIS_WAIT_REPLICAS,
        0,
        64,
        GucContext::Sighup,
        GucFlags::empty(),
    );
    GucRegistry::define_int_guc(
        c"broadcaster.redis_wait_timeout",
        c"How long WAIT waits for broadcaster.redis_wait_replicas replicas.",
        c"A batch they did not all acknowledge in time is sent again later, with the same event ids.",
        &REDIS_WAIT_TIMEOUT_MS,
        1,
        600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_enum_guc(
        c"broadcaster.message_mode",
        c"Stream entry layout: binary (one field per attribute) or structured (one JSON field).",
        c"",
        &MESSAGE_MODE,
        GucContext::Sighup,
        GucFlags::empty(),
    );
    GucRegistry::define_string_guc(
        c"broadcaster.file_path",
        c"File the file backend appends CloudEvents JSON lines to.",
        c"",
        &FILE_PATH,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_string_guc(
        c"broadcaster.default_source",
        c"CloudEvents source for events written without one.",
        c"Empty means postgresql:///<database>.",
        &DEFAULT_SOURCE,
        GucContext::Userset,
        GucFlags::empty(),
    );
    GucRegistry::define_int_guc(
        c"broadcaster.batch_size",
        c"Most events the worker claims and publishes in one round trip.",
        c"",
        &BATCH_SIZE,
        1,
        100_000,
        GucContext::Sighup,
        GucFlags::empty(),
    );
    GucRegistry::define_int_guc(
        c"broadcaster.poll_interval",
        c"Safety-net wake-up of an idle worker; commits wake it at once.",
        c"",
        &POLL_INTERVAL_MS,
        10,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"broadcaster.network_timeout",
        c"Bound on every broker connect, read and write.",
        c"",
        &NETWORK_TIMEOUT_MS,
        10,
        600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"broadcaster.retry_max_delay",
        c"Cap of the exponential backoff while the broker is unavailable.",
        c"",
        &RETRY_MAX_DELAY_MS,
        10,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"broadcaster.max_attempts",
        c"Attempts before an event the broker rejects is marked dead.",
        c"Broker outages never count as attempts.",
        &MAX_ATTEMPTS,
        1,
        1_000_000,
        GucContext::Sighup,
        GucFlags::empty(),
    );
    GucRegistry::define_int_guc(
        c"broadcaster.max_event_size",
        c"Largest event, its data plus the text of its attributes: larger ones are refused when written.",
        c"SQLSTATE 54000 at INSERT; a row written past the outbox trigger is rejected by the relay (and ends dead).",
        &MAX_EVENT_SIZE,
        1024,
        512 * 1024 * 1024,
        GucContext::Sighup,
        GucFlags::UNIT_BYTE,
    );
    GucRegistry::define_enum_guc(
        c"broadcaster.on_dead_event",
        c"hold: a dead event holds back later events of its partition key; skip: they flow on.",
        c"",
        &ON_DEAD_EVENT,
        GucContext::Sighup,
        GucFlags::empty(),
    );
    GucRegistry::define_int_guc(
        c"broadcaster.retention",
        c"How long published events are kept in broadcaster_published for replay; 0 keeps none.",
        c"",
        &RETENTION_S,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"broadcaster.health_timeout",
        c"broadcaster_health() is false when the last successful publish or check is older.",
        c"",
        &HEALTH_TIMEOUT_MS,
        100,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
}

fn string(setting: &GucSetting<Option<CString>>) -> Option<String> {
    setting
        .get()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
}

fn millis(setting: &GucSetting<i32>) -> Duration {
    Duration::from_millis(u64::try_from(setting.get()).unwrap_or(0))
}

/// `broadcaster.redis_url` as it stands (a secret: never to be logged).
pub fn redis_url() -> String {
    string(&REDIS_URL).unwrap_or_default()
}

/// `broadcaster.stream_prefix`; empty: no confinement.
pub fn stream_prefix() -> String {
    string(&STREAM_PREFIX).unwrap_or_default()
}

/// `broadcaster.max_event_size` in bytes; 0: no limit.
pub fn max_event_size() -> usize {
    usize::try_from(MAX_EVENT_SIZE.get()).unwrap_or(usize::MAX)
}

/// The databases to serve: `broadcaster.database` is one name or a comma-separated list.
pub fn databases() -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for name in string(&DATABASE).unwrap_or_default().split(',') {
        let name = name.trim();
        if !name.is_empty() && !names.iter().any(|n| n == name) {
            names.push(name.to_string());
        }
    }
    names
}

pub fn backend_name() -> String {
    string(&BACKEND).unwrap_or_else(|| "redis".into())
}

/// Explicit default source, if one is set.
pub fn default_source() -> Option<String> {
    string(&DEFAULT_SOURCE)
}

pub fn batch_size() -> usize {
    usize::try_from(BATCH_SIZE.get()).unwrap_or(1).max(1)
}

pub fn poll_interval() -> Duration {
    millis(&POLL_INTERVAL_MS)
}

pub fn retry_max_delay() -> Duration {
    millis(&RETRY_MAX_DELAY_MS)
}

pub fn max_attempts() -> i32 {
    MAX_ATTEMPTS.get()
}

/// Whether a dead event holds back the later events of its partition key.
pub fn dead_event_holds_key() -> bool {
    ON_DEAD_EVENT.get() == OnDeadEvent::Hold
}

pub fn retention() -> Duration {
    Duration::from_secs(u64::try_from(RETENTION_S.get()).unwrap_or(0))
}

pub fn health_timeout() -> Duration {
    millis(&HEALTH_TIMEOUT_MS)
}

/// How errors name the default backend's options: by the settings they come from.
const DEFAULT_BACKEND_LABELS: &[(&str, &str)] = &[
    ("url", "broadcaster.redis_url"),
    ("tls_ca_file", "broadcaster.redis_tls_ca_file"),
    ("tls_cert_file", "broadcaster.redis_tls_cert_file"),
    ("tls_key_file", "broadcaster.redis_tls_key_file"),
    ("stream_prefix", "broadcaster.stream_prefix"),
    ("stream", "broadcaster.stream"),
    ("maxlen", "broadcaster.redis_maxlen"),
    ("message_mode", "broadcaster.message_mode"),
    ("network_timeout", "broadcaster.network_timeout"),
    ("wait_replicas", "broadcaster.redis_wait_replicas"),
    ("wait_timeout", "broadcaster.redis_wait_timeout"),
    ("path", "broadcaster.file_path"),
];

/// What every backend of the relay serving `database` is told (`server`: None for the
/// default backend).
pub fn backend_context(database: &str, server: Option<&str>) -> Context {
    Context {
        server: server.map(str::to_string),
        database: database.to_string(),
        cluster: crate::pg::system_identifier(),
        timeout: millis(&NETWORK_TIMEOUT_MS),
        max_event_size: max_event_size(),
    }
}

/// The default backend's options as the `broadcaster.*` settings stand now, for the relay
/// serving `database`.
pub fn default_backend_options(database: &str) -> Options {
    let mut pairs = vec![
        ("url", redis_url()),
        ("stream_prefix", stream_prefix()),
        ("maxlen", REDIS_MAXLEN.get().to_string()),
        ("wait_replicas", REDIS_WAIT_REPLICAS.get().to_string()),
        ("wait_timeout", REDIS_WAIT_TIMEOUT_MS.get().to_string()),
        (
            "message_mode",
            match MESSAGE_MODE.get() {
                MessageModeSetting::Binary => "binary".to_string(),
                MessageModeSetting::Structured => "structured".to_string(),
            },
        ),
    ];
    let optional = [
        ("tls_ca_file", string(&REDIS_TLS_CA_FILE)),
        ("tls_cert_file", string(&REDIS_TLS_CERT_FILE)),
        ("tls_key_file", string(&REDIS_TLS_KEY_FILE)),
        ("stream", string(&STREAM)),
        ("path", string(&FILE_PATH)),
    ];
    pairs.extend(optional.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))));
    let mut options = Options::new(pairs).with_context(backend_context(database, None));
    options.labels = DEFAULT_BACKEND_LABELS;
    options
}
