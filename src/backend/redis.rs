//! Redis Streams backend: one `XADD` per event, a whole batch in one pipelined round trip.
//! The entry layout follows the CloudEvents Kafka binding (binary mode) or carries the whole
//! event as JSON (structured mode); the SDK's message serializers produce both.

use cloudevents::event::SpecVersion;
use cloudevents::message::{
    BinaryDeserializer, BinarySerializer, MessageAttributeValue, StructuredDeserializer,
    StructuredSerializer,
};
use redis::{Client, Cmd, Connection, ConnectionLike, RedisError, RedisWrite};

use super::{BackendConfig, BackendError, BatchOutcome, HeldKeys, MessageMode, PublisherBackend};
use crate::event::OutboxEvent;

/// Content type of a structured-mode entry.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";

pub struct RedisStreamBackend {
    client: Client,
    connection: Option<Connection>,
    /// The server de-duplicates `XADD ... IDMP` (Redis 8.6 and later); learnt on connect.
    idempotent_xadd: bool,
    config: BackendConfig,
    /// Buffers kept from batch to batch, so that a batch allocates nothing once they have grown:
    /// one entry's fields, the script's arguments, the command, and its bytes on the wire.
    entry: Cmd,
    argv: Cmd,
    command: Cmd,
    packed: Vec<u8>,
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
        Ok(Box::new(RedisStreamBackend::new(client, config)))
    }

    fn new(client: Client, config: &BackendConfig) -> Self {
        RedisStreamBackend {
            client,
            connection: None,
            idempotent_xadd: false,
            config: config.clone(),
            entry: Cmd::new(),
            argv: Cmd::new(),
            command: Cmd::new(),
            packed: Vec::new(),
        }
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

    /// Encodes `event`'s fields into `self.entry`, refused when larger than
    /// `broadcaster.max_event_size`.
    fn encode_entry(&mut self, event: &OutboxEvent) -> Result<(), BackendError> {
        self.entry.clear();
        write_entry(event, self.config.mode, &mut self.entry)?;
        let size: usize = self.entry.args_iter().map(|a| arg_bytes(&a).len()).sum();
        let max = self.config.max_event_size;
        if max > 0 && size > max {
            return Err(BackendError::Rejected(format!(
                "event is {size} bytes, above broadcaster.max_event_size ({max} bytes)"
            )));
        }
        Ok(())
    }

    /// Appends the encoded entry of `event` to the script's arguments.
    fn add_entry(&mut self, event: &OutboxEvent) {
        self.argv.arg(event.partition_key.as_deref().unwrap_or(""));
        if self.idempotent_xadd {
            // CloudEvents identity is source + id: two sources may reuse an id.
            self.argv
                .write_arg_fmt(format_args!("{} {}", event.source, event.id));
        } else {
            self.argv.arg("");
        }
        // The number of fields: name, value pairs.
        self.argv.arg(self.entry.args_iter().len() / 2);
        for field in self.entry.args_iter() {
            self.argv.arg(arg_bytes(&field));
        }
    }

    /// `EVALSHA` of [`BATCH_SCRIPT`] for the entries added to `self.argv`, those of
    /// `events[i]` for each `i` in `sent`, packed into `self.packed`.
    fn pack_command(&mut self, events: &[OutboxEvent], sent: &[usize]) {
        self.command.clear();
        self.command
            .arg("EVALSHA")
            .arg(BATCH_SCRIPT.get_hash())
            .arg(sent.len());
        for &i in sent {
            let stream = events[i].stream.as_deref();
            self.command.arg(stream.unwrap_or(&self.config.stream));
        }
        self.command
            .arg(self.config.maxlen)
            .arg(if self.idempotent_xadd {
                self.config.producer_id.as_str()
            } else {
                ""
            });
        for arg in self.argv.args_iter() {
            self.command.arg(arg_bytes(&arg));
        }
        self.packed.clear();
        self.command.write_packed_command(&mut self.packed);
    }
}

fn arg_bytes<'a>(arg: &redis::Arg<&'a [u8]>) -> &'a [u8] {
    match arg {
        redis::Arg::Simple(bytes) => bytes,
        // Only scan commands have cursors; none is ever written here.
        _ => &[],
    }
}

/// Reads the reply to a packed `EVALSHA` already sent; when the server doesn't have the script (a
/// restarted or flushed server), loads it and sends the command again.
fn receive_script_reply(c: &mut Connection, packed: &[u8]) -> Result<redis::Value, RedisError> {
    match c.recv_response().and_then(redis::Value::extract_error) {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            BATCH_SCRIPT.load(c)?;
            c.req_packed_command(packed)?.extract_error()
        }
        other => other,
    }
}

/// Adds a batch of entries in order, in one round trip. After an entry of a partition key fails,
/// the key's later entries in the batch are not added (nil): they stay pending behind it, so a
/// key's order survives a rejection. KEYS[i]: stream of entry i. ARGV: MAXLEN (0: none), IDMP
/// producer id ("": none), then per entry: partition key ("": none), event id, field count n,
/// n field/value pairs. Replies the number of entries when all were added; otherwise, per entry:
/// the entry id, `{'ERR', message}`, or `{'HELD'}` (markers rather than nil or false, which
/// RESP3 would turn into other types).
static BATCH_SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r#"
local maxlen, producer = ARGV[1], ARGV[2]
local trim, idmp = maxlen ~= '0', producer ~= ''
local held, replies, a, all = {}, {}, 3, true
for i = 1, #KEYS do
  local key, id, n = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  local first = a + 3
  a = first + 2 * n
  if key ~= '' and held[key] then
    replies[i] = {'HELD'}
    all = false
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
      all = false
      -- As data, not as an error reply: clients fail a whole reply holding an error.
      reply = {'ERR', reply.err}
    end
    replies[i] = reply
  end
end
if all then return #KEYS end
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
        self.publish_batch_overlapped(events, &mut || {})
    }

    fn publish_batch_overlapped(
        &mut self,
        events: &[OutboxEvent],
        meanwhile: &mut dyn FnMut(),
    ) -> Result<BatchOutcome, BackendError> {
        // Connect first: how entries are written depends on the server's version.
        self.connection()?;
        let mut outcome: BatchOutcome = Vec::with_capacity(events.len());
        let mut sent: Vec<usize> = Vec::with_capacity(events.len());
        // An event that can't be encoded is answered here, and holds its key's later events.
        let mut held = HeldKeys::default();
        self.argv.clear();
        for (i, event) in events.iter().enumerate() {
            if held.holds(event) {
                outcome.push(Err(BackendError::Held));
                continue;
            }
            match self.encode_entry(event) {
                Ok(()) => {
                    self.add_entry(event);
                    outcome.push(Ok(()));
                    sent.push(i);
                }
                Err(e) => {
                    held.fail(event);
                    outcome.push(Err(e));
                }
            }
        }
        if sent.is_empty() {
            meanwhile();
            return Ok(outcome);
        }
        self.pack_command(events, &sent);
        let packed = std::mem::take(&mut self.packed);
        let reply = self
            .with_connection(|c| c.send_packed_command(&packed))
            .and_then(|()| {
                meanwhile();
                self.with_connection(|c| receive_script_reply(c, &packed))
            });
        self.packed = packed;
        let replies = match reply? {
            // Every entry added.
            redis::Value::Int(n) if usize::try_from(n) == Ok(sent.len()) => return Ok(outcome),
            redis::Value::Array(replies) if replies.len() == sent.len() => replies,
            other => {
                self.connection = None;
                return Err(BackendError::Unavailable(format!(
                    "unexpected reply to a batch of {}: {other:?}",
                    sent.len()
                )));
            }
        };
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

/// Writes the fields of the stream entry for `event` to `out`, as name, value arguments.
fn write_entry(event: &OutboxEvent, mode: MessageMode, out: &mut Cmd) -> Result<(), BackendError> {
    let serialize_error = |e: cloudevents::message::Error| {
        BackendError::Rejected(format!("cannot serialize the CloudEvent: {e}"))
    };
    match mode {
        // The attributes through the SDK's binary serializer; the data's bytes as they are,
        // without parsing them.
        MessageMode::Binary => {
            event
                .attributes()?
                .deserialize_binary(EntryWriter(out))
                .map_err(serialize_error)?;
            if let Some(data) = event.data_bytes()? {
                out.arg("content-type")
                    .arg(event.datacontenttype.as_str())
                    .arg("data")
                    .arg(&*data);
            }
            Ok(())
        }
        MessageMode::Structured => event
            .to_cloud_event()?
            .deserialize_structured(EntryWriter(out))
            .map_err(serialize_error),
    }
}

/// Receives the event from the SDK's message deserializers and writes it as entry fields.
struct EntryWriter<'a>(&'a mut Cmd);

impl EntryWriter<'_> {
    fn field(self, name: std::fmt::Arguments<'_>, value: impl std::fmt::Display) -> Self {
        self.0.write_arg_fmt(name);
        self.0.write_arg_fmt(value);
        self
    }
}

impl BinarySerializer<()> for EntryWriter<'_> {
    fn set_spec_version(self, spec_version: SpecVersion) -> cloudevents::message::Result<Self> {
        Ok(self.field(format_args!("ce_specversion"), spec_version.as_str()))
    }

    fn set_attribute(
        self,
        name: &str,
        value: MessageAttributeValue,
    ) -> cloudevents::message::Result<Self> {
        // Like the Kafka binding: the data's content type is the message's content type.
        Ok(if name == "datacontenttype" {
            self.field(format_args!("content-type"), value)
        } else {
            self.field(format_args!("ce_{name}"), value)
        })
    }

    fn set_extension(
        self,
        name: &str,
        value: MessageAttributeValue,
    ) -> cloudevents::message::Result<Self> {
        Ok(self.field(format_args!("ce_{name}"), value))
    }

    fn end_with_data(self, bytes: Vec<u8>) -> cloudevents::message::Result<()> {
        self.0.arg("data").arg(bytes);
        Ok(())
    }

    fn end(self) -> cloudevents::message::Result<()> {
        Ok(())
    }
}

impl StructuredSerializer<()> for EntryWriter<'_> {
    fn set_structured_event(self, bytes: Vec<u8>) -> cloudevents::message::Result<()> {
        self.0
            .arg("content-type")
            .arg(STRUCTURED_CONTENT_TYPE)
            .arg("cloudevent")
            .arg(bytes);
        Ok(())
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

    type Fields = Vec<(String, Vec<u8>)>;

    /// The entry's fields as name, value pairs.
    fn encode(event: &OutboxEvent, mode: MessageMode) -> Result<Fields, BackendError> {
        let mut cmd = Cmd::new();
        write_entry(event, mode, &mut cmd)?;
        let args: Vec<Vec<u8>> = cmd.args_iter().map(|a| arg_bytes(&a).to_vec()).collect();
        Ok(args
            .chunks(2)
            .map(|p| (String::from_utf8_lossy(&p[0]).into_owned(), p[1].clone()))
            .collect())
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
        RedisStreamBackend::new(
            Client::open("redis://127.0.0.1:1").expect("valid url"),
            &config,
        )
    }

    /// The arguments of the command `b` sends for `events`, read back from its RESP bytes.
    fn sent_args(b: &mut RedisStreamBackend, events: &[OutboxEvent]) -> Vec<String> {
        b.argv.clear();
        for e in events {
            b.encode_entry(e).expect("encodes");
            b.add_entry(e);
        }
        let all: Vec<usize> = (0..events.len()).collect();
        b.pack_command(events, &all);
        // RESP: each argument is a `$len` line followed by its value.
        let text = String::from_utf8_lossy(&b.packed);
        let mut lines = text.split("\r\n");
        let mut args = Vec::new();
        while let Some(line) = lines.next() {
            if line.starts_with('$') {
                args.extend(lines.next().map(str::to_string));
            }
        }
        args
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
        let plain = sent_args(&mut b, &events);
        // EVALSHA sha numkeys keys... maxlen producer, then the first entry: key, IDMP id, the
        // number of fields, the fields.
        assert_eq!(plain[0], "EVALSHA");
        assert_eq!(plain[1], BATCH_SCRIPT.get_hash());
        assert_eq!(plain[2..9], ["2", "events", "audit", "1000", "", "c-1", ""]);
        let fields = encode(&event(), MessageMode::Binary).expect("encodes");
        assert_eq!(plain[9], fields.len().to_string());
        assert_eq!(plain[10], "ce_specversion");
        // Both entries, nothing else.
        assert_eq!(plain.len(), 7 + 2 * (3 + 2 * fields.len()));
        b.idempotent_xadd = true;
        let idmp = sent_args(&mut b, &events);
        assert_eq!(idmp[6], "broadcaster:shop");
        assert_eq!(idmp[8], format!("{} {}", event().source, event().id));
        assert_eq!(idmp.len(), plain.len());
    }

    #[test]
    fn oversized_events_are_rejected_before_sending() {
        let mut b = backend(BackendConfig {
            stream: "events".into(),
            max_event_size: 64,
            ..Default::default()
        });
        let mut big = event();
        big.data = Some(format!(r#"{{"blob": "{}"}}"#, "x".repeat(100)));
        let err = b.encode_entry(&big).expect_err("too big");
        assert!(matches!(err, BackendError::Rejected(_)));
        assert!(err.to_string().contains("max_event_size"), "{err}");
        assert!(
            b.encode_entry(&event()).is_err(),
            "the small one is 64+ bytes too"
        );
        b.config.max_event_size = 0;
        assert!(b.encode_entry(&big).is_ok(), "0: no limit");
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
