//! Events into Redis commands: the fields of a stream entry (CloudEvents binary or structured
//! mode), and a whole batch packed as one `MULTI`/`EXEC` transaction or one call of the batch
//! script ([`BATCH_SCRIPT`], `batch.lua`), ready to write on the connection.

use std::collections::HashMap;
use std::sync::{mpsc, Arc};

use cloudevents::event::SpecVersion;
use cloudevents::message::{BinaryDeserializer, BinarySerializer, MessageAttributeValue};
use redis::{Cmd, RedisWrite};

use super::config::RedisConfig;
use crate::backend::binding::Mode;
use crate::backend::Outcome;
use crate::event::OutboxEvent;

/// Content type of a structured-mode entry.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";

/// the next one from Postgres, this thread encodes it. Plain Rust runs there, never Postgres.
pub(super) struct AheadEncoder {
    jobs: mpsc::Sender<Job>,
    /// What the server takes; learnt on connect.
    pub(super) dialect: Dialect,
    /// Buffers of sent batches, for the next ones.
    pub(super) spare: Vec<Vec<u8>>,
}

/// A batch for the [`AheadEncoder`]'s thread; the result comes back through `done`.
struct Job {
    events: Arc<Vec<OutboxEvent>>,
    dialect: Dialect,
    packed: Vec<u8>,
    done: mpsc::SyncSender<Encoded>,
}

impl AheadEncoder {
    /// Starts the thread. It ends when this is dropped (with the backend).
    pub(super) fn start(config: &RedisConfig) -> Option<Self> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let mut encoder = Encoder::new(config);
        std::thread::Builder::new()
            .name("broadcaster encoder".into())
            .spawn(move || {
                for job in queue {
                    encoder.dialect = job.dialect;
                    encoder.spare = job.packed;
                    // The relay may have given up on the batch: then nobody waits.
                    let _ = job.done.send(encoder.encode(&job.events));
                }
            })
            .ok()?;
        Some(AheadEncoder {
            jobs,
            dialect: Dialect::default(),
            spare: Vec::new(),
        })
    }

    /// Has the thread encode `events`; the encoding comes back through what this returns.
    pub(super) fn prepare(
        &mut self,
        events: &Arc<Vec<OutboxEvent>>,
    ) -> Option<mpsc::Receiver<Encoded>> {
        let (done, encoded) = mpsc::sync_channel(1);
        let job = Job {
            events: Arc::clone(events),
            dialect: self.dialect,
            packed: self.spare.pop().unwrap_or_default(),
            done,
        };
        self.jobs.send(job).ok()?;
        Some(encoded)
    }
}

/// Turns a batch of events into one command. Apart from the connection, so that it encodes the
/// next batch while the server works on the current one.
pub(super) struct Encoder {
    pub(super) config: RedisConfig,
    /// What the server takes; learnt on connect.
    pub(super) dialect: Dialect,
    /// Buffers kept from batch to batch, so that a batch allocates nothing once they have grown:
    /// one entry's fields, the script's arguments, the command, and the bytes of a sent batch.
    entry: Cmd,
    argv: Cmd,
    command: Cmd,
    pub(super) spare: Vec<u8>,
    /// The longest argument of an entry encoded since the batch began.
    longest_arg: usize,
}

/// How a batch goes to the server.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Shape {
    /// `MULTI`, one `XADD` per entry, `EXEC`: nothing runs in between, so an entry is refused
    /// only for its stream (a key holding another type), and with it every entry of that
    /// stream. A key's entries all going to one stream, none of them overtakes another.
    Transaction,
    /// [`BATCH_SCRIPT`], for a batch where some key's entries go to more than one stream: it
    /// stops adding a key's entries after one of them fails. It costs the server about twice
    /// as much per entry.
    Script,
}

/// What a server takes, learnt when the relay connects to it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) struct Dialect {
    /// The server de-duplicates `XADD ... IDMP` (Redis 8.6 and later).
    pub(super) idempotent_xadd: bool,
    /// The server's `proto-max-bulk-len`: the largest argument it reads, in bytes. A larger one
    /// makes it drop the connection, so an entry with a larger field is refused before it is
    /// sent. Redis's default, 512 MiB, when the server won't say (`CONFIG` is often disabled
    /// on managed services), until the server refuses an argument
    /// ([`super::reply::refuses_argument`]).
    pub(super) max_bulk_len: usize,
    /// Whether `max_bulk_len` is what `CONFIG GET` said; false while it is Redis's default or
    /// learnt from a dropped connection.
    pub(super) max_bulk_len_told: bool,
}

impl Dialect {
    /// From what the server said when the relay connected ([`super::reply::probe`]).
    pub(super) fn of(info: &str, max_bulk_len: Option<usize>) -> Dialect {
        Dialect {
            idempotent_xadd: super::reply::server_version(info).is_some_and(|v| v >= (8, 6)),
            max_bulk_len: max_bulk_len.unwrap_or(Dialect::default().max_bulk_len),
            max_bulk_len_told: max_bulk_len.is_some(),
        }
    }

    /// This dialect, with what dropping an argument of `dropped + 1` bytes taught of the
    /// server's limit, when `CONFIG` did not tell it.
    pub(super) fn with_learnt_max_bulk_len(self, learnt: Option<usize>) -> Dialect {
        match learnt {
            Some(learnt) if !self.max_bulk_len_told => Dialect {
                max_bulk_len: self.max_bulk_len.min(learnt),
                ..self
            },
            _ => self,
        }
    }
}

impl Default for Dialect {
    fn default() -> Self {
        Dialect {
            idempotent_xadd: false,
            max_bulk_len: 512 * 1024 * 1024,
            max_bulk_len_told: false,
        }
    }
}

/// A batch ready to go: its commands on the wire, and the events answered without sending.
pub(super) struct Encoded {
    /// The server's dialect the entries were written for.
    pub(super) dialect: Dialect,
    pub(super) shape: Shape,
    /// Per event: an error for those not sent (too large, or held behind one), Ok for the rest
    /// until the reply says otherwise.
    pub(super) outcome: Vec<Outcome>,
    /// Indexes of the events in `packed`, in order.
    pub(super) sent: Vec<usize>,
    pub(super) packed: Vec<u8>,
    /// The longest argument in `packed`, in bytes: what to ask the server about when it drops
    /// the connection on this batch.
    pub(super) longest_arg: usize,
}

impl Encoder {
    pub(super) fn new(config: &RedisConfig) -> Self {
        Encoder {
            config: config.clone(),
            dialect: Dialect::default(),
            entry: Cmd::new(),
            argv: Cmd::new(),
            command: Cmd::new(),
            spare: Vec::new(),
            longest_arg: 0,
        }
    }

    /// The batch commands for `events`, in order. An event that can't be encoded is answered
    /// here, and holds its key's later events.
    pub(super) fn encode(&mut self, events: &[OutboxEvent]) -> Encoded {
        let shape = if self.some_key_spans_streams(events) {
            Shape::Script
        } else {
            Shape::Transaction
        };
        let mut outcome: Vec<Outcome> = Vec::with_capacity(events.len());
        let mut sent: Vec<usize> = Vec::with_capacity(events.len());
        // Keys of events that could not be encoded: their later events are not sent.
        let mut held: std::collections::HashSet<&str> = std::collections::HashSet::new();
        let mut packed = std::mem::take(&mut self.spare);
        packed.clear();
        self.argv.clear();
        self.longest_arg = 0;
        if shape == Shape::Transaction {
            packed.extend_from_slice(MULTI);
        }
        for (i, event) in events.iter().enumerate() {
            let key = event.partition_key.as_deref();
            if key.is_some_and(|k| held.contains(k)) {
                outcome.push(Outcome::NotSent);
                continue;
            }
            let encoded = match shape {
                Shape::Transaction => self.write_xadd(event, &mut packed),
                Shape::Script => self.encode_entry(event).map(|()| self.add_entry(event)),
            };
            match encoded {
                Ok(()) => {
                    outcome.push(Outcome::Delivered);
                    sent.push(i);
                }
                Err(why) => {
                    held.extend(key);
                    outcome.push(Outcome::Rejected(why));
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
            dialect: self.dialect,
            shape,
            outcome,
            sent,
            packed,
            longest_arg: self.longest_arg,
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
    fn check(&self, event: &OutboxEvent) -> Result<(), String> {
        event
            .size()
            .check(self.config.max_event_size)
            .map_err(|e| e.to_string())?;
        if let Some(stream) = &event.stream {
            crate::event::validate_stream(stream, &self.config.stream_prefix)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Appends `XADD` of `event` to `packed`, refused when the event is larger than
    /// `broadcaster.max_event_size` (counted as the row trigger counts it, [`OutboxEvent::size`]).
    /// Only a row written past that trigger can be.
    fn write_xadd(&mut self, event: &OutboxEvent, packed: &mut Vec<u8>) -> Result<(), String> {
        self.check(event)?;
        let stream = event.stream.as_deref().unwrap_or(&self.config.stream);
        let command = &mut self.command;
        command.clear();
        command.arg("XADD").arg(stream);
        if self.dialect.idempotent_xadd {
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
        let longest = check_bulk_lengths(command, &self.dialect)?;
        self.longest_arg = self.longest_arg.max(longest);
        command.write_packed_command(packed);
        Ok(())
    }

    /// Encodes `event`'s fields into `self.entry`, refused when larger than
    /// `broadcaster.max_event_size` (as in [`Encoder::write_xadd`]).
    pub(super) fn encode_entry(&mut self, event: &OutboxEvent) -> Result<(), String> {
        self.check(event)?;
        self.entry.clear();
        write_entry(event, self.config.mode, &mut self.entry)?;
        let longest = check_bulk_lengths(&self.entry, &self.dialect)?;
        self.longest_arg = self.longest_arg.max(longest);
        Ok(())
    }

    /// Appends the encoded entry of `event` to the script's arguments.
    fn add_entry(&mut self, event: &OutboxEvent) {
        self.argv.arg(event.partition_key.as_deref().unwrap_or(""));
        if self.dialect.idempotent_xadd {
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
            .arg(if self.dialect.idempotent_xadd {
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

/// Refuses a command with an argument longer than the server reads (`proto-max-bulk-len`):
/// sent, it would make the server drop the connection, which looks like an outage and never
/// charges the event an attempt. Ok: its longest argument, in bytes.
fn check_bulk_lengths(command: &Cmd, dialect: &Dialect) -> Result<usize, String> {
    let longest = command
        .args_iter()
        .map(|a| arg_bytes(&a).len())
        .max()
        .unwrap_or(0);
    let max = dialect.max_bulk_len;
    if longest <= max {
        Ok(longest)
    } else if dialect.max_bulk_len_told {
        Err(format!(
            "a field of the entry is {longest} bytes, over the server's proto-max-bulk-len of {max} bytes"
        ))
    } else if max == Dialect::default().max_bulk_len {
        Err(format!(
            "a field of the entry is {longest} bytes, over Redis's default proto-max-bulk-len of {max} bytes (the server won't say its own: CONFIG GET is refused)"
        ))
    } else {
        Err(format!(
            "a field of the entry is {longest} bytes, over the server's proto-max-bulk-len: it refused an argument of {} bytes (CONFIG GET is refused, so the limit itself is not known)",
            max + 1
        ))
    }
}

/// `MULTI` and `EXEC` on the wire.
pub(super) const MULTI: &[u8] = b"*1\r\n$5\r\nMULTI\r\n";
pub(super) const EXEC: &[u8] = b"*1\r\n$4\r\nEXEC\r\n";

pub(super) fn arg_bytes<'a>(arg: &redis::Arg<&'a [u8]>) -> &'a [u8] {
    match arg {
        redis::Arg::Simple(bytes) => bytes,
        // Only scan commands have cursors; none is ever written here.
        _ => &[],
    }
}

/// The batch script (`batch.lua`): adds a batch's entries in order, in one round trip, and stops
/// a partition key at its first failed entry. Used for a batch where some key's entries go to
/// more than one stream, where a transaction could not keep the key's order.
pub(super) static BATCH_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(include_str!("batch.lua")));

/// Writes the fields of the stream entry for `event` to `out`, as name, value arguments.
pub(super) fn write_entry(event: &OutboxEvent, mode: Mode, out: &mut Cmd) -> Result<(), String> {
    let serialize_error =
        |e: cloudevents::message::Error| format!("cannot serialize the CloudEvent: {e}");
    let invalid = |e: crate::event::EventError| e.to_string();
    match mode {
        // The attributes through the SDK's binary serializer; the data's bytes as they are,
        // without parsing them.
        Mode::Binary => {
            event
                .attributes()
                .map_err(invalid)?
                .deserialize_binary(EntryWriter(out))
                .map_err(serialize_error)?;
            // Every attribute the row has: datacontenttype too when there is no data.
            out.arg("content-type").arg(event.datacontenttype.as_str());
            if let Some(data) = event.data_bytes().map_err(invalid)? {
                out.arg("data").arg(&*data);
            }
            Ok(())
        }
        // The stored JSON text as the event's data, unchanged (duplicate keys, formatting):
        // never parsed into a value and printed again.
        Mode::Structured => {
            out.arg("content-type")
                .arg(STRUCTURED_CONTENT_TYPE)
                .arg("cloudevent")
                .arg(event.structured_json().map_err(invalid)?);
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
