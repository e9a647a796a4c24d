//! Redis Streams backend: one `XADD` per event, a whole batch in one pipelined round trip.
//! The entry layout follows the CloudEvents Kafka binding (binary mode) or carries the whole
//! event as JSON (structured mode); the SDK's message serializers produce both.

use cloudevents::event::SpecVersion;
use cloudevents::message::{
    BinaryDeserializer, BinarySerializer, MessageAttributeValue, StructuredDeserializer,
    StructuredSerializer,
};
use redis::{Client, Connection, RedisError};

use super::{BackendConfig, BackendError, BatchOutcome, HeldKeys, MessageMode, PublisherBackend};
use crate::event::OutboxEvent;

/// Content type of a structured-mode entry.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";

/// Field names and values of one stream entry, in the order they are written.
pub type Fields = Vec<(String, Vec<u8>)>;

pub struct RedisStreamBackend {
    client: Client,
    connection: Option<Connection>,
    /// The server de-duplicates `XADD ... IDMP` (Redis 8.6 and later); learnt on connect.
    idempotent_xadd: bool,
    config: BackendConfig,
}

impl RedisStreamBackend {
    pub fn from_config(config: &BackendConfig) -> Result<Box<dyn PublisherBackend>, BackendError> {
        // The URL may hold a password: the error says what is wrong without repeating it.
        let url_error = |e: RedisError| {
            BackendError::Config(format!(
                "broadcaster.redis_url is not a valid Redis URL ({:?}); expected redis[s]://[user:password@]host[:port][/db]",
                e.kind()
            ))
        };
        let client = if config.redis_tls_ca_file.is_empty() {
            Client::open(config.redis_url.as_str()).map_err(url_error)?
        } else {
            let ca = std::fs::read(&config.redis_tls_ca_file).map_err(|e| {
                BackendError::Config(format!(
                    "cannot read broadcaster.redis_tls_ca_file {}: {e}",
                    config.redis_tls_ca_file
                ))
            })?;
            let certs = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(ca),
            };
            Client::build_with_tls(config.redis_url.as_str(), certs).map_err(url_error)?
        };
        if config.stream.is_empty() {
            return Err(BackendError::Config(
                "the default stream name is empty".into(),
            ));
        }
        Ok(Box::new(RedisStreamBackend {
            client,
            connection: None,
            idempotent_xadd: false,
            config: config.clone(),
        }))
    }

    fn connection(&mut self) -> Result<&mut Connection, BackendError> {
        if self.connection.is_none() {
            let timeout = Some(self.config.timeout);
            let connection = self
                .client
                .get_connection_with_timeout(self.config.timeout)
                .and_then(|mut c| {
                    c.set_read_timeout(timeout)?;
                    c.set_write_timeout(timeout)?;
                    let info: String = redis::cmd("INFO").arg("server").query(&mut c)?;
                    Ok((c, info))
                })
                .map_err(classify)?;
            let (connection, info) = connection;
            self.idempotent_xadd = server_version(&info).is_some_and(|v| v >= (8, 6));
            self.connection = Some(connection);
        }
        self.connection
            .as_mut()
            .ok_or_else(|| BackendError::Unavailable("no connection".into()))
    }

    /// Runs `f` on the connection; an outage drops the connection so the next call reconnects.
    fn with_connection<T>(
        &mut self,
        f: impl FnOnce(&mut Connection) -> Result<T, RedisError>,
    ) -> Result<T, BackendError> {
        let result = f(self.connection()?).map_err(classify);
        if matches!(result, Err(BackendError::Unavailable(_))) {
            self.connection = None;
        }
        result
    }

    /// The entry's fields, refused when larger than `broadcaster.max_event_size`.
    fn entry(&self, event: &OutboxEvent) -> Result<Fields, BackendError> {
        let fields = encode(event, self.config.mode)?;
        let size: usize = fields.iter().map(|(k, v)| k.len() + v.len()).sum();
        let max = self.config.max_event_size;
        if max > 0 && size > max {
            return Err(BackendError::Rejected(format!(
                "event is {size} bytes, above broadcaster.max_event_size ({max} bytes)"
            )));
        }
        Ok(fields)
    }

    /// One `EVALSHA` of [`BATCH_SCRIPT`] for `events`; `entries[i]` is None for an event not
    /// to send (it is answered nil, like a held one).
    fn invocation<'a>(
        &self,
        events: &[OutboxEvent],
        entries: &[Option<Fields>],
    ) -> redis::ScriptInvocation<'a> {
        let mut inv = BATCH_SCRIPT.prepare_invoke();
        inv.arg(self.config.maxlen);
        inv.arg(if self.idempotent_xadd {
            self.config.producer_id.as_str()
        } else {
            ""
        });
        for (event, fields) in events.iter().zip(entries) {
            let Some(fields) = fields else { continue };
            inv.key(event.stream.as_deref().unwrap_or(&self.config.stream));
            inv.arg(event.partition_key.as_deref().unwrap_or(""));
            // CloudEvents identity is source + id: two sources may reuse an id.
            inv.arg(format!("{} {}", event.source, event.id));
            inv.arg(fields.len());
            for (name, value) in fields {
                inv.arg(name.as_str()).arg(value.as_slice());
            }
        }
        inv
    }
}

/// Adds a batch of entries in order, in one round trip. After an entry of a partition key fails,
/// the key's later entries in the batch are not added (nil): they stay pending behind it, so a
/// key's order survives a rejection. KEYS[i]: stream of entry i. ARGV: MAXLEN (0: none), IDMP
/// producer id ("": none), then per entry: partition key ("": none), event id, field count n,
/// n field/value pairs. Replies, per entry: the entry id, `{'ERR', message}`, or `{'HELD'}`
/// (markers rather than nil or false, which RESP3 would turn into other types).
static BATCH_SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r#"
local maxlen, producer = ARGV[1], ARGV[2]
local trim, idmp = maxlen ~= '0', producer ~= ''
local held, replies, a = {}, {}, 3
for i = 1, #KEYS do
  local key, id, n = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  local first = a + 3
  a = first + 2 * n
  if key ~= '' and held[key] then
    replies[i] = {'HELD'}
  else
    local reply
    if idmp and trim then
      reply = redis.pcall('XADD', KEYS[i], 'IDMP', producer, id, 'MAXLEN', '~', maxlen, '*', unpack(ARGV, first, a - 1))
    elseif idmp then
      reply = redis.pcall('XADD', KEYS[i], 'IDMP', producer, id, '*', unpack(ARGV, first, a - 1))
    elseif trim then
      reply = redis.pcall('XADD', KEYS[i], 'MAXLEN', '~', maxlen, '*', unpack(ARGV, first, a - 1))
    else
      reply = redis.pcall('XADD', KEYS[i], '*', unpack(ARGV, first, a - 1))
    end
    if type(reply) == 'table' and reply.err then
      if key ~= '' then held[key] = true end
      -- As data, not as an error reply: clients fail a whole reply holding an error.
      reply = {'ERR', reply.err}
    end
    replies[i] = reply
  end
end
return replies
"#,
    )
});

impl PublisherBackend for RedisStreamBackend {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn publish(&mut self, event: &OutboxEvent) -> Result<(), BackendError> {
        self.publish_batch(std::slice::from_ref(event))?
            .pop()
            .unwrap_or(Ok(()))
    }

    fn publish_batch(&mut self, events: &[OutboxEvent]) -> Result<BatchOutcome, BackendError> {
        // Connect first: how entries are written depends on the server's version.
        self.connection()?;
        let mut outcome: BatchOutcome = Vec::with_capacity(events.len());
        let mut entries = Vec::with_capacity(events.len());
        // An event that can't be encoded is answered here, and holds its key's later events.
        let mut held = HeldKeys::default();
        for event in events {
            if held.holds(event) {
                outcome.push(Err(BackendError::Held));
                entries.push(None);
                continue;
            }
            match self.entry(event) {
                Ok(fields) => {
                    outcome.push(Ok(()));
                    entries.push(Some(fields));
                }
                Err(e) => {
                    held.fail(event);
                    outcome.push(Err(e));
                    entries.push(None);
                }
            }
        }
        let sent: Vec<usize> = (0..events.len())
            .filter(|&i| entries[i].is_some())
            .collect();
        if sent.is_empty() {
            return Ok(outcome);
        }
        let invocation = self.invocation(events, &entries);
        // Raw value: a typed reply would turn one entry's error into the whole batch's.
        let replies = match self.with_connection(|c| invocation.invoke::<redis::Value>(c))? {
            redis::Value::Array(replies) => replies,
            other => {
                self.connection = None;
                return Err(BackendError::Unavailable(format!(
                    "unexpected reply to the batch: {other:?}"
                )));
            }
        };
        if replies.len() != sent.len() {
            self.connection = None;
            return Err(BackendError::Unavailable(format!(
                "expected {} replies from the batch, got {}",
                sent.len(),
                replies.len()
            )));
        }
        for (i, reply) in sent.into_iter().zip(replies) {
            outcome[i] = entry_outcome(reply);
        }
        Ok(outcome)
    }

    fn health_check(&mut self) -> Result<(), BackendError> {
        self.with_connection(|c| redis::cmd("PING").query::<String>(c).map(drop))
    }
}

/// One entry's reply from the batch script. Only an entry id counts as delivered.
fn entry_outcome(reply: redis::Value) -> Result<(), BackendError> {
    let text = |v: &redis::Value| redis::from_redis_value_ref::<String>(v).ok();
    match reply {
        redis::Value::BulkString(_) | redis::Value::SimpleString(_) => Ok(()),
        redis::Value::Array(marker) => match marker.first().and_then(text).as_deref() {
            Some("HELD") => Err(BackendError::Held),
            Some("ERR") => Err(classify_message(
                marker
                    .get(1)
                    .and_then(text)
                    .unwrap_or_else(|| "unknown error".into()),
            )),
            _ => Err(BackendError::Unavailable(format!(
                "unexpected reply for an entry: {marker:?}"
            ))),
        },
        other => Err(BackendError::Unavailable(format!(
            "unexpected reply for an entry: {other:?}"
        ))),
    }
}

/// An error a script reported for one entry, as `CODE message`.
fn classify_message(message: String) -> BackendError {
    let code = message.split_whitespace().next().unwrap_or_default();
    if OUTAGE_CODES.contains(&code) {
        BackendError::Unavailable(message)
    } else {
        BackendError::Rejected(message)
    }
}

/// `(major, minor)` from the `redis_version:` line of `INFO server`.
fn server_version(info: &str) -> Option<(u32, u32)> {
    let version = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))?
        .trim();
    let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??))
}

/// Error codes that say the server can't take writes now, whatever the entry.
const OUTAGE_CODES: &[&str] = &[
    "LOADING",
    "BUSY",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "MASTERDOWN",
    "READONLY",
    "OOM",
    "NOAUTH",
    "WRONGPASS",
    "NOPERM",
];

/// Outages (the broker can't be reached, is loading, read-only, out of memory, refuses our
/// credentials) are not the event's fault; anything else the server answers is a rejection.
fn classify(e: RedisError) -> BackendError {
    let outage = e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.kind() == redis::ErrorKind::AuthenticationFailed
        || e.code().is_some_and(|code| OUTAGE_CODES.contains(&code));
    if outage {
        BackendError::Unavailable(e.to_string())
    } else {
        BackendError::Rejected(e.to_string())
    }
}

/// The fields of the stream entry for `event`.
pub fn encode(event: &OutboxEvent, mode: MessageMode) -> Result<Fields, BackendError> {
    let serialize_error = |e: cloudevents::message::Error| {
        BackendError::Rejected(format!("cannot serialize the CloudEvent: {e}"))
    };
    match mode {
        // The attributes through the SDK's binary serializer; the data's bytes as they are,
        // without parsing them.
        MessageMode::Binary => {
            let mut fields = event
                .attributes()?
                .deserialize_binary(EntryWriter::default())
                .map_err(serialize_error)?;
            if let Some(data) = event.data_bytes()? {
                fields.push((
                    "content-type".into(),
                    event.datacontenttype.clone().into_bytes(),
                ));
                fields.push(("data".into(), data));
            }
            Ok(fields)
        }
        MessageMode::Structured => event
            .to_cloud_event()?
            .deserialize_structured(EntryWriter::default())
            .map_err(serialize_error),
    }
}

/// Receives the event from the SDK's message deserializers and lays it out as entry fields.
#[derive(Default)]
struct EntryWriter {
    fields: Fields,
}

impl EntryWriter {
    fn push(mut self, name: String, value: impl Into<Vec<u8>>) -> Self {
        self.fields.push((name, value.into()));
        self
    }
}

impl BinarySerializer<Fields> for EntryWriter {
    fn set_spec_version(self, spec_version: SpecVersion) -> cloudevents::message::Result<Self> {
        Ok(self.push("ce_specversion".into(), spec_version.as_str()))
    }

    fn set_attribute(
        self,
        name: &str,
        value: MessageAttributeValue,
    ) -> cloudevents::message::Result<Self> {
        // Like the Kafka binding: the data's content type is the message's content type.
        let field = if name == "datacontenttype" {
            "content-type".to_string()
        } else {
            format!("ce_{name}")
        };
        Ok(self.push(field, value.to_string()))
    }

    fn set_extension(
        self,
        name: &str,
        value: MessageAttributeValue,
    ) -> cloudevents::message::Result<Self> {
        Ok(self.push(format!("ce_{name}"), value.to_string()))
    }

    fn end_with_data(self, bytes: Vec<u8>) -> cloudevents::message::Result<Fields> {
        Ok(self.push("data".into(), bytes).fields)
    }

    fn end(self) -> cloudevents::message::Result<Fields> {
        Ok(self.fields)
    }
}

impl StructuredSerializer<Fields> for EntryWriter {
    fn set_structured_event(self, bytes: Vec<u8>) -> cloudevents::message::Result<Fields> {
        Ok(self
            .push("content-type".into(), STRUCTURED_CONTENT_TYPE)
            .push("cloudevent".into(), bytes)
            .fields)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event() -> OutboxEvent {
        OutboxEvent {
            id: "7d2c5bd4-4f7e-4a53-8d4c-5d1d7a1c0e11".into(),
            ty: "order.created".into(),
            source: "/shop".into(),
            subject: Some("order-1".into()),
            time: "2026-11-27T07:00:00Z".into(),
            datacontenttype: "application/json".into(),
            dataschema: None,
            data: Some(r#"{"n": 1}"#.into()),
            partition_key: Some("c-1".into()),
            extensions: json!({"tenant": "acme"})
                .as_object()
                .cloned()
                .unwrap_or_default(),
            stream: None,
        }
    }

    fn field<'a>(fields: &'a Fields, name: &str) -> Option<&'a str> {
        fields
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    #[test]
    fn binary_mode_has_one_field_per_attribute() {
        let fields = encode(&event(), MessageMode::Binary).expect("encodes");
        assert_eq!(field(&fields, "ce_specversion"), Some("1.0"));
        assert_eq!(
            field(&fields, "ce_id"),
            Some("7d2c5bd4-4f7e-4a53-8d4c-5d1d7a1c0e11")
        );
        assert_eq!(field(&fields, "ce_source"), Some("/shop"));
        assert_eq!(field(&fields, "ce_type"), Some("order.created"));
        assert_eq!(field(&fields, "ce_time"), Some("2026-11-27T07:00:00+00:00"));
        assert_eq!(field(&fields, "ce_subject"), Some("order-1"));
        assert_eq!(field(&fields, "ce_partitionkey"), Some("c-1"));
        assert_eq!(field(&fields, "ce_tenant"), Some("acme"));
        assert_eq!(field(&fields, "content-type"), Some("application/json"));
        assert_eq!(field(&fields, "data"), Some(r#"{"n": 1}"#));
        assert_eq!(field(&fields, "ce_dataschema"), None);
        assert_eq!(field(&fields, "ce_datacontenttype"), None);
    }

    #[test]
    fn structured_mode_is_one_cloudevents_json_field() {
        let fields = encode(&event(), MessageMode::Structured).expect("encodes");
        assert_eq!(fields.len(), 2);
        assert_eq!(
            field(&fields, "content-type"),
            Some(STRUCTURED_CONTENT_TYPE)
        );
        let body = field(&fields, "cloudevent").expect("cloudevent field");
        let parsed: cloudevents::Event = serde_json::from_str(body).expect("SDK parses it");
        assert_eq!(parsed, event().to_cloud_event().expect("valid"));
    }

    fn backend(config: BackendConfig) -> RedisStreamBackend {
        RedisStreamBackend {
            client: Client::open("redis://127.0.0.1:1").expect("valid url"),
            connection: None,
            idempotent_xadd: false,
            config,
        }
    }

    fn args(inv: &redis::ScriptInvocation<'_>) -> Vec<String> {
        let mut con = Recorder(Vec::new());
        let _ = inv.invoke::<redis::Value>(&mut con);
        con.0
    }

    /// Captures the command a script invocation sends instead of sending it.
    struct Recorder(Vec<String>);

    impl redis::ConnectionLike for Recorder {
        fn req_packed_command(&mut self, cmd: &[u8]) -> redis::RedisResult<redis::Value> {
            // RESP: each argument is a `$len` line followed by its value.
            let text = String::from_utf8_lossy(cmd);
            let mut lines = text.split("\r\n");
            self.0.clear();
            while let Some(line) = lines.next() {
                if line.starts_with('$') {
                    self.0.extend(lines.next().map(str::to_string));
                }
            }
            Ok(redis::Value::Array(Vec::new()))
        }
        fn req_packed_commands(
            &mut self,
            _: &[u8],
            _: usize,
            _: usize,
        ) -> redis::RedisResult<Vec<redis::Value>> {
            Ok(Vec::new())
        }
        fn get_db(&self) -> i64 {
            0
        }
        fn check_connection(&mut self) -> bool {
            true
        }
        fn is_open(&self) -> bool {
            true
        }
    }

    #[test]
    fn batch_names_streams_trims_and_uses_idmp_when_the_server_has_it() {
        let mut b = backend(BackendConfig {
            stream: "events".into(),
            maxlen: 1000,
            producer_id: "broadcaster:shop".into(),
            ..Default::default()
        });
        let mut routed = event();
        routed.stream = Some("audit".into());
        let events = [event(), routed.clone()];
        let entries: Vec<Option<Fields>> = events.iter().map(|e| b.entry(e).ok()).collect();
        let plain = args(&b.invocation(&events, &entries));
        // EVALSHA sha numkeys keys... maxlen producer, then the first entry.
        assert_eq!(plain[0], "EVALSHA");
        assert_eq!(plain[2..8], ["2", "events", "audit", "1000", "", "c-1"]);
        b.idempotent_xadd = true;
        let idmp = args(&b.invocation(&events, &entries));
        assert_eq!(idmp[6], "broadcaster:shop");
        assert_eq!(idmp[8], format!("{} {}", routed.source, routed.id));
    }

    #[test]
    fn oversized_events_are_rejected_before_sending() {
        let b = backend(BackendConfig {
            stream: "events".into(),
            max_event_size: 64,
            ..Default::default()
        });
        let mut big = event();
        big.data = Some(format!(r#"{{"blob": "{}"}}"#, "x".repeat(100)));
        let err = b.entry(&big).expect_err("too big");
        assert!(matches!(err, BackendError::Rejected(_)));
        assert!(err.to_string().contains("max_event_size"), "{err}");
    }

    #[test]
    fn only_an_entry_id_counts_as_delivered() {
        use redis::Value;
        let s = |t: &str| Value::BulkString(t.as_bytes().to_vec());
        assert!(entry_outcome(s("1700000000000-0")).is_ok());
        assert!(matches!(
            entry_outcome(Value::Array(vec![s("HELD")])),
            Err(BackendError::Held)
        ));
        assert!(matches!(
            entry_outcome(Value::Array(vec![
                s("ERR"),
                s("WRONGTYPE Operation against a key")
            ])),
            Err(BackendError::Rejected(_))
        ));
        assert!(matches!(
            entry_outcome(Value::Array(vec![s("ERR"), s("OOM command not allowed")])),
            Err(BackendError::Unavailable(_))
        ));
        // RESP3 turns a Lua false into a boolean: never mistaken for a delivery.
        assert!(entry_outcome(Value::Boolean(false)).is_err());
        assert!(entry_outcome(Value::Nil).is_err());
    }

    #[test]
    fn server_versions() {
        assert_eq!(
            server_version("# Server\r\nredis_version:7.0.15\r\n"),
            Some((7, 0))
        );
        assert_eq!(server_version("redis_version:8.6.1\n"), Some((8, 6)));
        assert_eq!(server_version("nothing"), None);
    }

    #[test]
    fn bad_url_is_a_config_error_without_the_secret() {
        let config = BackendConfig {
            redis_url: "http://user:s3cret@host".into(),
            stream: "s".into(),
            ..Default::default()
        };
        let err = RedisStreamBackend::from_config(&config)
            .err()
            .expect("refused");
        assert!(matches!(err, BackendError::Config(_)));
        assert!(!err.to_string().contains("s3cret"));
    }

    #[test]
    fn unreachable_broker_is_unavailable_not_rejected() {
        // Port 1 on loopback: nothing listens there, the connect is refused at once.
        let config = BackendConfig {
            redis_url: "redis://127.0.0.1:1".into(),
            stream: "s".into(),
            timeout: std::time::Duration::from_millis(500),
            ..Default::default()
        };
        let mut backend = RedisStreamBackend::from_config(&config).expect("valid config");
        assert!(matches!(
            backend.health_check(),
            Err(BackendError::Unavailable(_))
        ));
        assert!(matches!(
            backend.publish_batch(&[event()]),
            Err(BackendError::Unavailable(_))
        ));
    }
}
