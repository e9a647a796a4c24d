//! Redis Streams backend: one `XADD` per event, a whole batch in one `MULTI`/`EXEC` round trip.
//! The entry layout follows the CloudEvents Kafka binding (binary mode) or carries the whole
//! event as JSON (structured mode): the SDK's binary serializer writes the attributes, and the
//! structured JSON carries the stored data text unchanged (`OutboxEvent::structured_json`).

use std::collections::HashMap;
use std::sync::{mpsc, Arc};

use cloudevents::event::SpecVersion;
use cloudevents::message::{BinaryDeserializer, BinarySerializer, MessageAttributeValue};
use redis::{Client, Cmd, Connection, ConnectionLike, RedisError, RedisWrite};

use super::{
    BackendConfig, BackendError, BatchOutcome, HeldKeys, MessageMode, Prepare, Prepared,
    PublisherBackend,
};
use crate::event::OutboxEvent;

/// Content type of a structured-mode entry.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";

pub struct RedisStreamBackend {
    client: Client,
    connection: Option<Connection>,
    /// Encodes the batches that were not prepared.
    encoder: Encoder,
    /// Encodes the batches prepared ahead, on a thread of its own; None if it can't start.
    ahead: Option<AheadEncoder>,
}

/// An [`Encoder`] on a thread of its own: while the server works on a batch and the relay claims
/// the next one from Postgres, this thread encodes it. Plain Rust runs there, never Postgres.
struct AheadEncoder {
    jobs: mpsc::Sender<Job>,
    /// Whether entries are written for a server that de-duplicates; learnt on connect.
    idempotent_xadd: bool,
    /// Buffers of sent batches, for the next ones.
    spare: Vec<Vec<u8>>,
}

/// A batch for the [`AheadEncoder`]'s thread; the result comes back through `done`.
struct Job {
    events: Arc<Vec<OutboxEvent>>,
    idempotent_xadd: bool,
    packed: Vec<u8>,
    done: mpsc::SyncSender<Encoded>,
}

impl AheadEncoder {
    /// Starts the thread. It ends when this is dropped (with the backend).
    fn start(config: &BackendConfig) -> Option<Self> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let mut encoder = Encoder::new(config);
        std::thread::Builder::new()
            .name("broadcaster encoder".into())
            .spawn(move || {
                for job in queue {
                    encoder.idempotent_xadd = job.idempotent_xadd;
                    encoder.spare = job.packed;
                    // The relay may have given up on the batch: then nobody waits.
                    let _ = job.done.send(encoder.encode(&job.events));
                }
            })
            .ok()?;
        Some(AheadEncoder {
            jobs,
            idempotent_xadd: false,
            spare: Vec::new(),
        })
    }
}

impl Prepare for AheadEncoder {
    fn prepare(&mut self, events: &Arc<Vec<OutboxEvent>>) -> Option<Prepared> {
        let (done, encoded) = mpsc::sync_channel(1);
        let job = Job {
            events: Arc::clone(events),
            idempotent_xadd: self.idempotent_xadd,
            packed: self.spare.pop().unwrap_or_default(),
            done,
        };
        self.jobs.send(job).ok()?;
        Some(Prepared(Box::new(encoded)))
    }
}

/// Turns a batch of events into one command. Apart from the connection, so that it encodes the
/// next batch while the server works on the current one.
struct Encoder {
    config: BackendConfig,
    /// The server de-duplicates `XADD ... IDMP` (Redis 8.6 and later); learnt on connect.
    idempotent_xadd: bool,
    /// Buffers kept from batch to batch, so that a batch allocates nothing once they have grown:
    /// one entry's fields, the script's arguments, the command, and the bytes of a sent batch.
    entry: Cmd,
    argv: Cmd,
    command: Cmd,
    spare: Vec<u8>,
}

/// How a batch goes to the server.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Shape {
    /// `MULTI`, one `XADD` per entry, `EXEC`: nothing runs in between, so an entry is refused
    /// only for its stream (a key holding another type), and with it every entry of that
    /// stream. A key's entries all going to one stream, none of them overtakes another.
    Transaction,
    /// [`BATCH_SCRIPT`], for a batch where some key's entries go to more than one stream: it
    /// stops adding a key's entries after one of them fails. It costs the server about twice
    /// as much per entry.
    Script,
}

/// A batch ready to go: its commands on the wire, and the events answered without sending.
struct Encoded {
    /// Whether entries were written for a server that de-duplicates.
    idempotent_xadd: bool,
    shape: Shape,
    /// Per event: an error for those not sent (too large, or held behind one), Ok for the rest
    /// until the reply says otherwise.
    outcome: BatchOutcome,
    /// Indexes of the events in `packed`, in order.
    sent: Vec<usize>,
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
        let read = |setting: &str, path: &str| {
            std::fs::read(path)
                .map_err(|e| BackendError::Config(format!("cannot read {setting} {path}: {e}")))
        };
        let client_tls = match (
            config.redis_tls_cert_file.as_str(),
            config.redis_tls_key_file.as_str(),
        ) {
            ("", "") => None,
            ("", _) | (_, "") => {
                return Err(BackendError::Config(
                    "broadcaster.redis_tls_cert_file and broadcaster.redis_tls_key_file go together: set both, or neither".into(),
                ))
            }
            (cert, key) => Some(redis::ClientTlsConfig {
                client_cert: read("broadcaster.redis_tls_cert_file", cert)?,
                client_key: read("broadcaster.redis_tls_key_file", key)?,
            }),
        };
        let root_cert = match config.redis_tls_ca_file.as_str() {
            "" => None,
            ca => Some(read("broadcaster.redis_tls_ca_file", ca)?),
        };
        let client = if client_tls.is_none() && root_cert.is_none() {
            Client::open(config.redis_url.as_str()).map_err(url_error)?
        } else {
            let certs = redis::TlsCertificates {
                client_tls,
                root_cert,
            };
            Client::build_with_tls(config.redis_url.as_str(), certs).map_err(url_error)?
        };
        if config.stream.is_empty() {
            return Err(BackendError::Config(
                "the default stream name is empty".into(),
            ));
        }
        if let Err(e) = crate::event::validate_stream(&config.stream, &config.stream_prefix) {
            return Err(BackendError::Config(format!(
                "the default stream (broadcaster.stream): {e}"
            )));
        }
        Ok(Box::new(RedisStreamBackend::new(client, config)))
    }

    fn new(client: Client, config: &BackendConfig) -> Self {
        RedisStreamBackend {
            client,
            connection: None,
            encoder: Encoder::new(config),
            ahead: AheadEncoder::start(config),
        }
    }

    fn connection(&mut self) -> Result<&mut Connection, BackendError> {
        if self.connection.is_none() {
            let timeout = Some(self.encoder.config.timeout);
            let connection = self
                .client
                .get_connection_with_timeout(self.encoder.config.timeout)
                .and_then(|mut c| {
                    c.set_read_timeout(timeout)?;
                    c.set_write_timeout(timeout)?;
                    let info: String = redis::cmd("INFO").arg("server").query(&mut c)?;
                    Ok((c, info))
                })
                .map_err(classify)?;
            let (connection, info) = connection;
            self.encoder.idempotent_xadd = server_version(&info).is_some_and(|v| v >= (8, 6));
            self.connection = Some(connection);
        }
        self.connection
            .as_mut()
            .ok_or_else(|| BackendError::Unavailable("no connection".into()))
    }

    /// What encodes the next batch while this one is in flight: the thread, if it started.
    fn preparer(&mut self) -> &mut dyn Prepare {
        match self.ahead.as_mut() {
            Some(ahead) => ahead,
            None => &mut self.encoder,
        }
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
}

impl Encoder {
    fn new(config: &BackendConfig) -> Self {
        Encoder {
            config: config.clone(),
            idempotent_xadd: false,
            entry: Cmd::new(),
            argv: Cmd::new(),
            command: Cmd::new(),
            spare: Vec::new(),
        }
    }

    /// The batch commands for `events`, in order. An event that can't be encoded is answered
    /// here, and holds its key's later events.
    fn encode(&mut self, events: &[OutboxEvent]) -> Encoded {
        let shape = if self.some_key_spans_streams(events) {
            Shape::Script
        } else {
            Shape::Transaction
        };
        let mut outcome: BatchOutcome = Vec::with_capacity(events.len());
        let mut sent: Vec<usize> = Vec::with_capacity(events.len());
        let mut held = HeldKeys::default();
        let mut packed = std::mem::take(&mut self.spare);
        packed.clear();
        self.argv.clear();
        if shape == Shape::Transaction {
            packed.extend_from_slice(MULTI);
        }
        for (i, event) in events.iter().enumerate() {
            if held.holds(event) {
                outcome.push(Err(BackendError::Held));
                continue;
            }
            let encoded = match shape {
                Shape::Transaction => self.write_xadd(event, &mut packed),
                Shape::Script => self.encode_entry(event).map(|()| self.add_entry(event)),
            };
            match encoded {
                Ok(()) => {
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
            packed.clear();
        } else if shape == Shape::Transaction {
            packed.extend_from_slice(EXEC);
        } else {
            self.pack_command(events, &sent, &mut packed);
        }
        Encoded {
            idempotent_xadd: self.idempotent_xadd,
            shape,
            outcome,
            sent,
            packed,
        }
    }

    fn stream_of<'a>(&'a self, event: &'a OutboxEvent) -> &'a str {
        event.stream.as_deref().unwrap_or(&self.config.stream)
    }

    /// Whether some partition key's events go to more than one stream in `events`.
    fn some_key_spans_streams(&self, events: &[OutboxEvent]) -> bool {
        let Some(first) = events.first() else {
            return false;
        };
        let stream = self.stream_of(first);
        if events.iter().all(|e| self.stream_of(e) == stream) {
            return false;
        }
        let mut streams: HashMap<&str, &str> = HashMap::new();
        events.iter().any(|e| {
            e.partition_key.as_deref().is_some_and(|key| {
                *streams.entry(key).or_insert_with(|| self.stream_of(e)) != self.stream_of(e)
            })
        })
    }

    /// What the row trigger checks and a row written past it may break: the size, counted as
    /// the trigger counts it ([`OutboxEvent::size`]), and the stream within
    /// `broadcaster.stream_prefix`.
    fn check(&self, event: &OutboxEvent) -> Result<(), BackendError> {
        event.size().check(self.config.max_event_size)?;
        if let Some(stream) = &event.stream {
            crate::event::validate_stream(stream, &self.config.stream_prefix)?;
        }
        Ok(())
    }

    /// Appends `XADD` of `event` to `packed`, refused when the event is larger than
    /// `broadcaster.max_event_size` (counted as the row trigger counts it, [`OutboxEvent::size`]).
    /// Only a row written past that trigger can be.
    fn write_xadd(
        &mut self,
        event: &OutboxEvent,
        packed: &mut Vec<u8>,
    ) -> Result<(), BackendError> {
        self.check(event)?;
        let stream = event.stream.as_deref().unwrap_or(&self.config.stream);
        let command = &mut self.command;
        command.clear();
        command.arg("XADD").arg(stream);
        if self.idempotent_xadd {
            // CloudEvents identity is source + id: two sources may reuse an id.
            command
                .arg("IDMP")
                .arg(self.config.producer_id.as_str())
                .write_arg_fmt(format_args!("{} {}", event.source, event.id));
        }
        if self.config.maxlen > 0 {
            command.arg("MAXLEN").arg("~").arg(self.config.maxlen);
        }
        command.arg("*");
        write_entry(event, self.config.mode, command)?;
        command.write_packed_command(packed);
        Ok(())
    }

    /// Encodes `event`'s fields into `self.entry`, refused when larger than
    /// `broadcaster.max_event_size` (as in [`Encoder::write_xadd`]).
    fn encode_entry(&mut self, event: &OutboxEvent) -> Result<(), BackendError> {
        self.check(event)?;
        self.entry.clear();
        write_entry(event, self.config.mode, &mut self.entry)
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
    /// `events[i]` for each `i` in `sent`, packed into `packed`.
    fn pack_command(&mut self, events: &[OutboxEvent], sent: &[usize], packed: &mut Vec<u8>) {
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
        self.command.write_packed_command(packed);
    }
}

impl Prepare for Encoder {
    fn prepare(&mut self, events: &Arc<Vec<OutboxEvent>>) -> Option<Prepared> {
        let (done, encoded) = mpsc::sync_channel(1);
        done.send(self.encode(events)).ok()?;
        Some(Prepared(Box::new(encoded)))
    }
}

/// `MULTI` and `EXEC` on the wire.
const MULTI: &[u8] = b"*1\r\n$5\r\nMULTI\r\n";
const EXEC: &[u8] = b"*1\r\n$4\r\nEXEC\r\n";

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
        self.publish_batch_overlapped(events, None, &mut |_| {})
    }

    fn publish_batch_overlapped(
        &mut self,
        events: &[OutboxEvent],
        prepared: Option<Prepared>,
        meanwhile: &mut dyn FnMut(&mut dyn Prepare),
    ) -> Result<BatchOutcome, BackendError> {
        // Connect first: how entries are written depends on the server's version.
        self.connection()?;
        let idempotent_xadd = self.encoder.idempotent_xadd;
        let Encoded {
            shape,
            mut outcome,
            sent,
            packed,
            ..
        } = prepared
            .and_then(|p| p.0.downcast::<mpsc::Receiver<Encoded>>().ok())
            .and_then(|encoded| encoded.recv().ok())
            .filter(|e| e.idempotent_xadd == idempotent_xadd && e.outcome.len() == events.len())
            .unwrap_or_else(|| self.encoder.encode(events));
        if let Some(ahead) = self.ahead.as_mut() {
            ahead.idempotent_xadd = idempotent_xadd;
        }
        if sent.is_empty() {
            meanwhile(self.preparer());
            return Ok(outcome);
        }
        let replies = self
            .with_connection(|c| c.send_packed_command(&packed))
            .and_then(|()| {
                meanwhile(self.preparer());
                self.with_connection(|c| match shape {
                    Shape::Transaction => receive_transaction_replies(c, sent.len()),
                    Shape::Script => receive_script_reply(c, &packed)
                        .and_then(|reply| script_outcomes(reply, sent.len())),
                })
            });
        match self.ahead.as_mut() {
            Some(ahead) if ahead.spare.len() < 2 => ahead.spare.push(packed),
            _ => self.encoder.spare = packed,
        }
        let replies = match replies {
            Ok(Ok(replies)) => replies,
            Ok(Err(e)) | Err(e) => {
                // Replies may be left unread or out of step: the next batch must not take them
                // for its own, so it starts on a new connection.
                self.connection = None;
                return Err(e);
            }
        };
        for (i, reply) in sent.into_iter().zip(replies) {
            outcome[i] = reply;
        }
        hold_after_first_failure(events, &mut outcome);
        Ok(outcome)
    }

    fn health_check(&mut self) -> Result<(), BackendError> {
        self.with_connection(|c| redis::cmd("PING").query::<String>(c).map(drop))
    }
}

/// Per-entry outcomes of a batch sent as a transaction: the replies to `MULTI`, to each of the
/// `n` `XADD`s, and to `EXEC`. An `XADD` refused while queued (the server out of memory, say)
/// makes `EXEC` discard them all: that entry is answered with its error and the others are
/// held, not sent. The inner `Err` means the replies are not what was sent for.
fn receive_transaction_replies(
    c: &mut Connection,
    n: usize,
) -> Result<Result<BatchOutcome, BackendError>, RedisError> {
    let in_transaction = matches!(c.recv_response()?, redis::Value::Okay);
    // While queued, each reply is `QUEUED` or why the entry was refused. Had `MULTI` itself
    // been refused, each `XADD` ran on its own: its reply is its outcome (and `EXEC` fails).
    let mut direct: BatchOutcome = Vec::new();
    let mut refused: Vec<(usize, BackendError)> = Vec::new();
    for i in 0..n {
        let reply = entry_outcome(c.recv_response()?);
        if !in_transaction {
            direct.push(reply);
        } else if let Err(e) = reply {
            refused.push((i, e));
        }
    }
    let exec = c.recv_response()?;
    if !in_transaction {
        return Ok(Ok(direct));
    }
    Ok(match exec {
        redis::Value::Array(replies) if replies.len() == n => {
            Ok(replies.into_iter().map(entry_outcome).collect())
        }
        // Discarded for the refused entries: the others were never added.
        redis::Value::ServerError(_) if !refused.is_empty() => {
            let mut outcome: BatchOutcome = (0..n).map(|_| Err(BackendError::Held)).collect();
            for (i, e) in refused {
                outcome[i] = Err(e);
            }
            Ok(outcome)
        }
        // The batch as a whole, e.g. EXEC refused for lack of memory.
        redis::Value::ServerError(e) => Err(classify_message(server_error_message(&e))),
        other => Err(BackendError::Unavailable(format!(
            "unexpected reply to a batch of {n}: {other:?}"
        ))),
    })
}

/// Per-entry outcomes from the batch script's reply.
fn script_outcomes(
    reply: redis::Value,
    n: usize,
) -> Result<Result<BatchOutcome, BackendError>, RedisError> {
    Ok(match reply {
        // Every entry added.
        redis::Value::Int(added) if usize::try_from(added) == Ok(n) => {
            Ok((0..n).map(|_| Ok(())).collect())
        }
        redis::Value::Array(replies) if replies.len() == n => {
            Ok(replies.into_iter().map(script_entry_outcome).collect())
        }
        other => Err(BackendError::Unavailable(format!(
            "unexpected reply to a batch of {n}: {other:?}"
        ))),
    })
}

/// After an event of a key fails, the key's later failures in the batch were refused for the
/// same reason (their stream): they are held behind it, not failed attempts of their own.
fn hold_after_first_failure(events: &[OutboxEvent], outcome: &mut BatchOutcome) {
    if outcome.iter().all(Result::is_ok) {
        return;
    }
    let mut failed = HeldKeys::default();
    for (event, result) in events.iter().zip(outcome.iter_mut()) {
        if matches!(result, Err(BackendError::Rejected(_))) {
            if failed.holds(event) {
                *result = Err(BackendError::Held);
            } else {
                failed.fail(event);
            }
        }
    }
}

/// One entry's reply to `XADD`. Only an entry id counts as delivered.
fn entry_outcome(reply: redis::Value) -> Result<(), BackendError> {
    match reply {
        redis::Value::BulkString(_) | redis::Value::SimpleString(_) => Ok(()),
        redis::Value::ServerError(e) => Err(classify_message(server_error_message(&e))),
        other => Err(BackendError::Unavailable(format!(
            "unexpected reply for an entry: {other:?}"
        ))),
    }
}

/// `CODE message`, as the server wrote it.
fn server_error_message(e: &redis::ServerError) -> String {
    match e.details() {
        Some(details) => format!("{} {details}", e.code()),
        None => e.code().to_string(),
    }
}

/// One entry's reply from the batch script. Only an entry id counts as delivered.
fn script_entry_outcome(reply: redis::Value) -> Result<(), BackendError> {
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

/// An error the server reported for one entry, as `CODE message`.
fn classify_message(message: String) -> BackendError {
    let code = message.split_whitespace().next().unwrap_or_default();
    if is_outage(code, &message) {
        BackendError::Unavailable(message)
    } else {
        BackendError::Rejected(message)
    }
}

/// Whether a server error with `code` (and its whole `message`) says the server can't take
/// writes now, whatever the entry ([`OUTAGE_CODES`]). Except a `NOPERM` about a key: the
/// relay's ACL user may not write the stream this event names (`~prefix*`), which is the
/// event's fault, not the broker's; held as an outage it would stall every event behind it.
/// Redis words it "no permissions to access one of the keys" (7.0) or "No permissions to
/// access a key" (7.2 and later); a command it may not run is "... to run the 'xadd' command".
fn is_outage(code: &str, message: &str) -> bool {
    if code == "NOPERM" && message.to_ascii_lowercase().contains("access") {
        return false;
    }
    OUTAGE_CODES.contains(&code)
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
        || e.code().is_some_and(|code| is_outage(code, &e.to_string()));
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
            // Every attribute the row has: datacontenttype too when there is no data.
            out.arg("content-type").arg(event.datacontenttype.as_str());
            if let Some(data) = event.data_bytes()? {
                out.arg("data").arg(&*data);
            }
            Ok(())
        }
        // The stored JSON text as the event's data, unchanged (duplicate keys, formatting):
        // never parsed into a value and printed again.
        MessageMode::Structured => {
            out.arg("content-type")
                .arg(STRUCTURED_CONTENT_TYPE)
                .arg("cloudevent")
                .arg(event.structured_json()?);
            Ok(())
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
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

    #[test]
    fn a_key_the_acl_forbids_is_the_events_fault_a_command_is_an_outage() {
        let reject = |m: &str| matches!(classify_message(m.into()), BackendError::Rejected(_));
        // Redis 7.0 and 7.2+ wordings for a key outside the user's `~pattern`.
        assert!(reject(
            "NOPERM this user has no permissions to access one of the keys used as arguments"
        ));
        assert!(reject("NOPERM No permissions to access a key"));
        // A command the user may not run, and the other outages, stop the batch.
        assert!(!reject(
            "NOPERM this user has no permissions to run the 'xadd' command"
        ));
        assert!(!reject(
            "NOPERM User relay has no permissions to run the 'xadd' command"
        ));
        assert!(!reject(
            "OOM command not allowed when used memory > 'maxmemory'."
        ));
        assert!(reject(
            "WRONGTYPE Operation against a key holding the wrong kind of value"
        ));
    }

    /// Text a producer may write into a column: anything, with the characters that break
    /// encoders more likely than chance makes them.
    fn hostile_text() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[a-z.]{1,12}",
            proptest::collection::vec(
                prop_oneof![
                    Just('\t'),
                    Just('\n'),
                    Just('\u{0}'),
                    Just('\u{7f}'),
                    Just('\u{85}'),
                    Just('\u{fdd0}'),
                    Just('\u{fffe}'),
                    Just('\u{10ffff}'),
                    Just('"'),
                    Just('\\'),
                    any::<char>(),
                ],
                0..24
            )
            .prop_map(|cs| cs.into_iter().collect()),
        ]
    }

    /// `data` as PostgreSQL's json type may hold it: JSON of arbitrary strings and numbers,
    /// lone surrogate escapes, nesting around the parser's limit, long strings, and garbage.
    fn hostile_data() -> impl Strategy<Value = String> {
        prop_oneof![
            hostile_text()
                .prop_map(|s| serde_json::to_string(&json!({ "s": s })).unwrap_or_default()),
            hostile_text().prop_map(|s| serde_json::to_string(&s).unwrap_or_default()),
            Just(r#"{"s":"\ud83d"}"#.to_string()),
            Just(r#""\udc00\ud83d""#.to_string()),
            Just(r#"{"s":"\ud83d\ude00"}"#.to_string()),
            Just(r#"{"a":1,"a":2}"#.to_string()),
            Just("1e999999".to_string()),
            Just("-0.000000000000000000000000000001".to_string()),
            (0usize..300).prop_map(|depth| format!("{}1{}", "[".repeat(depth), "]".repeat(depth))),
            (0usize..200_000).prop_map(|n| format!("\"{}\"", "x".repeat(n))),
            hostile_text(),
        ]
    }

    fn hostile_extensions() -> impl Strategy<Value = serde_json::Value> {
        let value = prop_oneof![
            hostile_text().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<i32>().prop_map(serde_json::Value::from),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<f64>().prop_map(|f| json!(f)),
            Just(serde_json::Value::Null),
            Just(json!([1])),
        ];
        proptest::collection::btree_map(prop_oneof!["[a-z0-9]{1,20}", hostile_text()], value, 0..4)
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect()))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// Issue 14: whatever a producer writes, the row trigger's checks never panic, and an
        /// event they accept encodes in both message modes, within `max_event_size`.
        #[test]
        fn accepted_events_encode(
            ty in hostile_text(),
            source in prop_oneof!["/[a-z]{1,8}".prop_map(String::from), hostile_text()],
            subject in proptest::option::of(hostile_text()),
            datacontenttype in prop_oneof![
                Just("application/json".to_string()),
                Just("text/plain".to_string()),
                hostile_text(),
            ],
            dataschema in proptest::option::of(prop_oneof![
                Just("https://example.com/s.json".to_string()),
                hostile_text(),
            ]),
            data in proptest::option::of(hostile_data()),
            extensions in hostile_extensions(),
            partition_key in proptest::option::of(hostile_text()),
            max in prop_oneof![Just(0usize), 64usize..300_000],
        ) {
            let row = crate::event::EventRow {
                ty: Some(&ty),
                source: Some(&source),
                subject: subject.as_deref(),
                datacontenttype: Some(&datacontenttype),
                dataschema: dataschema.as_deref(),
                data: data.as_deref(),
                extensions: Some(&extensions),
                stream: None,
                partition_key: partition_key.as_deref(),
            };
            if row.validate(max, "").is_ok() {
                let event = OutboxEvent {
                    id: "7d2c5bd4-4f7e-4a53-8d4c-5d1d7a1c0e11".into(),
                    ty: ty.clone(),
                    source: source.clone(),
                    subject: subject.clone(),
                    time: "2026-11-27T07:00:00.000000Z".into(),
                    datacontenttype: datacontenttype.clone(),
                    dataschema: dataschema.clone(),
                    data: data.clone(),
                    partition_key: partition_key.clone(),
                    extensions: extensions.as_object().cloned().unwrap_or_default(),
                    stream: None,
                };
                for mode in [MessageMode::Binary, MessageMode::Structured] {
                    let mut b = backend(BackendConfig {
                        stream: "events".into(),
                        max_event_size: max,
                        mode,
                        ..Default::default()
                    });
                    let encoded = b.encoder.encode(std::slice::from_ref(&event));
                    prop_assert!(
                        encoded.outcome.iter().all(Result::is_ok),
                        "accepted, then refused in {mode:?}: {:?}",
                        encoded.outcome
                    );
                }
            }
        }
    }

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
    /// The commands `b` would send for `events`, each as its arguments.
    fn sent_commands(b: &mut RedisStreamBackend, events: &[OutboxEvent]) -> Vec<Vec<String>> {
        let encoded = b.encoder.encode(events);
        // RESP: `*n` starts a command, then each argument is a `$len` line and its value.
        let text = String::from_utf8_lossy(&encoded.packed);
        let mut lines = text.split("\r\n");
        let mut commands: Vec<Vec<String>> = Vec::new();
        while let Some(line) = lines.next() {
            if line.starts_with('*') {
                commands.push(Vec::new());
            } else if line.starts_with('$') {
                let arg = lines.next().unwrap_or_default().to_string();
                commands.last_mut().expect("a command").push(arg);
            }
        }
        commands
    }

    #[test]
    fn batch_is_one_transaction_naming_streams_trimming_and_using_idmp_when_available() {
        let mut b = backend(BackendConfig {
            stream: "events".into(),
            maxlen: 1000,
            producer_id: "broadcaster:shop".into(),
            ..Default::default()
        });
        let mut routed = event();
        routed.stream = Some("audit".into());
        routed.partition_key = Some("c-2".into());
        let events = [event(), routed];
        let fields = encode(&event(), MessageMode::Binary).expect("encodes");
        let plain = sent_commands(&mut b, &events);
        assert_eq!(plain.len(), 4, "MULTI, two XADDs, EXEC");
        assert_eq!(plain[0], ["MULTI"]);
        assert_eq!(
            plain[1][..6],
            ["XADD", "events", "MAXLEN", "~", "1000", "*"]
        );
        assert_eq!(plain[1][6], "ce_specversion");
        assert_eq!(plain[1].len(), 6 + 2 * fields.len());
        assert_eq!(plain[2][..2], ["XADD", "audit"]);
        assert_eq!(plain[3], ["EXEC"]);

        b.encoder.idempotent_xadd = true;
        b.encoder.config.maxlen = 0;
        let idmp = sent_commands(&mut b, &events);
        let id = format!("{} {}", event().source, event().id);
        assert_eq!(
            idmp[1][..6],
            [
                "XADD",
                "events",
                "IDMP",
                "broadcaster:shop",
                id.as_str(),
                "*"
            ]
        );
        assert_eq!(idmp[1].len(), 6 + 2 * fields.len());
    }

    #[test]
    fn a_key_going_to_two_streams_goes_through_the_script() {
        let mut b = backend(BackendConfig {
            stream: "events".into(),
            ..Default::default()
        });
        let mut routed = event();
        routed.stream = Some("audit".into());
        let events = [event(), routed];
        let commands = sent_commands(&mut b, &events);
        assert_eq!(commands.len(), 1);
        let script = &commands[0];
        // EVALSHA sha numkeys keys... maxlen producer, then the first entry: key, IDMP id, the
        // number of fields, the fields.
        assert_eq!(script[0], "EVALSHA");
        assert_eq!(script[1], BATCH_SCRIPT.get_hash());
        assert_eq!(script[2..9], ["2", "events", "audit", "0", "", "c-1", ""]);
        let fields = encode(&event(), MessageMode::Binary).expect("encodes");
        assert_eq!(script[9], fields.len().to_string());
        assert_eq!(script[10], "ce_specversion");
        assert_eq!(script.len(), 7 + 2 * (3 + 2 * fields.len()));
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
        let mut other = event();
        other.partition_key = Some("c-2".into());
        let encoded = b.encoder.encode(&[big.clone(), event(), other.clone()]);
        let err = encoded.outcome[0].as_ref().expect_err("too big");
        assert!(matches!(
            err,
            BackendError::Event(crate::event::EventError::TooLarge { .. })
        ));
        assert!(err.to_string().contains("max_event_size"), "{err}");
        assert!(
            matches!(encoded.outcome[1], Err(BackendError::Held)),
            "its key's next event waits"
        );
        assert!(
            encoded.outcome[2].is_err(),
            "the small one is 64+ bytes too"
        );
        b.encoder.config.max_event_size = 0;
        let encoded = b.encoder.encode(&[big, other]);
        assert!(encoded.outcome.iter().all(Result::is_ok), "0: no limit");
        assert_eq!(encoded.sent, [0, 1]);
        // The script path checks the same.
        b.encoder.config.max_event_size = 64;
        assert!(b.encoder.encode_entry(&event()).is_err());
    }

    #[test]
    fn only_an_entry_id_counts_as_delivered() {
        use redis::Value;
        let s = |t: &str| Value::BulkString(t.as_bytes().to_vec());
        let error = |line: &str| match redis::parse_redis_value(format!("-{line}\r\n").as_bytes()) {
            Ok(v) => v,
            Err(e) => panic!("{e}"),
        };
        assert!(entry_outcome(s("1700000000000-0")).is_ok());
        assert!(matches!(
            entry_outcome(error("WRONGTYPE Operation against a key")),
            Err(BackendError::Rejected(m)) if m.starts_with("WRONGTYPE Operation")
        ));
        assert!(matches!(
            entry_outcome(error("OOM command not allowed")),
            Err(BackendError::Unavailable(_))
        ));
        assert!(entry_outcome(Value::Nil).is_err());

        assert!(script_entry_outcome(s("1700000000000-0")).is_ok());
        assert!(matches!(
            script_entry_outcome(Value::Array(vec![s("HELD")])),
            Err(BackendError::Held)
        ));
        assert!(matches!(
            script_entry_outcome(Value::Array(vec![
                s("ERR"),
                s("WRONGTYPE Operation against a key")
            ])),
            Err(BackendError::Rejected(_))
        ));
        assert!(matches!(
            script_entry_outcome(Value::Array(vec![s("ERR"), s("OOM command not allowed")])),
            Err(BackendError::Unavailable(_))
        ));
        // RESP3 turns a Lua false into a boolean: never mistaken for a delivery.
        assert!(script_entry_outcome(Value::Boolean(false)).is_err());
        assert!(script_entry_outcome(Value::Nil).is_err());
    }

    #[test]
    fn a_keys_later_failures_are_held_behind_its_first() {
        let keyed = |k: Option<&str>| OutboxEvent {
            partition_key: k.map(str::to_string),
            ..event()
        };
        let events = [keyed(Some("a")), keyed(Some("a")), keyed(None), keyed(None)];
        let rejected = || Err(BackendError::Rejected("WRONGTYPE".into()));
        let mut outcome: BatchOutcome = vec![rejected(), rejected(), rejected(), rejected()];
        hold_after_first_failure(&events, &mut outcome);
        assert!(matches!(outcome[0], Err(BackendError::Rejected(_))));
        assert!(matches!(outcome[1], Err(BackendError::Held)));
        // Without a key, each event fails on its own.
        assert!(matches!(outcome[2], Err(BackendError::Rejected(_))));
        assert!(matches!(outcome[3], Err(BackendError::Rejected(_))));
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
