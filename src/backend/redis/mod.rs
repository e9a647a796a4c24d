//! Redis Streams backend: one `XADD` per event, a whole batch in one `MULTI`/`EXEC` round trip
//! (or one call of `batch.lua` when a key's events go to several streams). The entry layout
//! follows the CloudEvents Kafka binding (binary mode) or carries the whole event as JSON
//! (structured mode).
//!
//! - `config.rs`: its options;
//! - `encode.rs`: events into entries, batches into commands;
//! - `reply.rs`: replies into outcomes, errors into outages or rejections;
//! - `batch.lua`: the script.

use std::sync::{mpsc, Arc};

use redis::{Client, Connection, RedisError};

use super::{Backend, BatchError, Outcome, Pipelined, PublisherBackend};
use crate::event::OutboxEvent;

mod config;
mod encode;
mod reply;
#[cfg(test)]
mod tests;

pub use config::{MessageMode, RedisConfig};
pub use encode::STRUCTURED_CONTENT_TYPE;
use encode::{AheadEncoder, Encoded, Encoder, Shape};
use reply::{classify, receive_script_reply, receive_transaction_replies, script_outcomes};

pub struct RedisStreamBackend {
    client: Client,
    connection: Option<Connection>,
    /// Encodes the batches that were not prepared.
    encoder: Encoder,
    /// Encodes the batches prepared ahead, on a thread of its own; None if it can't start.
    ahead: Option<AheadEncoder>,
    /// The batch prepared ahead, and its encoding to come.
    prepared: Option<(Arc<Vec<OutboxEvent>>, mpsc::Receiver<Encoded>)>,
    /// The batch sent and not yet received.
    in_flight: Option<InFlight>,
}

/// What [`Pipelined::receive`] needs of the batch [`Pipelined::send`] sent.
struct InFlight {
    shape: Shape,
    outcome: Vec<Outcome>,
    sent: Vec<usize>,
    packed: Vec<u8>,
}

impl Backend for RedisStreamBackend {
    type Config = RedisConfig;

    fn new(config: RedisConfig) -> Result<Self, BatchError> {
        let read = |option: &str, path: &str| {
            std::fs::read(path)
                .map_err(|e| BatchError::Misconfigured(format!("cannot read {option} {path}: {e}")))
        };
        let client_tls = match (config.tls_cert_file.as_str(), config.tls_key_file.as_str()) {
            ("", _) | (_, "") => None,
            (cert, key) => Some(redis::ClientTlsConfig {
                client_cert: read("tls_cert_file", cert)?,
                client_key: read("tls_key_file", key)?,
            }),
        };
        let root_cert = match config.tls_ca_file.as_str() {
            "" => None,
            ca => Some(read("tls_ca_file", ca)?),
        };
        // The URL may hold a password: the error says what is wrong without repeating it.
        let url_error = |e: RedisError| {
            BatchError::Misconfigured(format!("not a valid Redis URL ({:?})", e.kind()))
        };
        let client = if client_tls.is_none() && root_cert.is_none() {
            Client::open(config.url.as_str()).map_err(url_error)?
        } else {
            let certs = redis::TlsCertificates {
                client_tls,
                root_cert,
            };
            Client::build_with_tls(config.url.as_str(), certs).map_err(url_error)?
        };
        Ok(RedisStreamBackend::with_client(client, &config))
    }
}

impl RedisStreamBackend {
    fn with_client(client: Client, config: &RedisConfig) -> Self {
        RedisStreamBackend {
            client,
            connection: None,
            encoder: Encoder::new(config),
            ahead: AheadEncoder::start(config),
            prepared: None,
            in_flight: None,
        }
    }

    fn connection(&mut self) -> Result<&mut Connection, BatchError> {
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
            self.encoder.idempotent_xadd =
                reply::server_version(&info).is_some_and(|v| v >= (8, 6));
            self.connection = Some(connection);
        }
        self.connection
            .as_mut()
            .ok_or_else(|| BatchError::Unavailable("no connection".into()))
    }

    /// Runs `f` on the connection; any error drops the connection, so that the next call
    /// starts on a new one and never takes a reply left unread for its own.
    fn with_connection<T>(
        &mut self,
        f: impl FnOnce(&mut Connection) -> Result<T, RedisError>,
    ) -> Result<T, BatchError> {
        let result = f(self.connection()?).map_err(classify);
        if result.is_err() {
            self.connection = None;
        }
        result
    }

    /// The encoding of `events`: the one prepared ahead when it is for these events and the
    /// server's dialect has not changed since, else made now.
    fn encoded(&mut self, events: &Arc<Vec<OutboxEvent>>) -> Encoded {
        let idempotent_xadd = self.encoder.idempotent_xadd;
        if let Some(ahead) = self.ahead.as_mut() {
            ahead.idempotent_xadd = idempotent_xadd;
        }
        self.prepared
            .take()
            .filter(|(prepared, _)| Arc::ptr_eq(prepared, events))
            .and_then(|(_, encoded)| encoded.recv().ok())
            .filter(|e| e.idempotent_xadd == idempotent_xadd && e.outcome.len() == events.len())
            .unwrap_or_else(|| self.encoder.encode(events))
    }

    /// Keeps a sent batch's buffer for a later one.
    fn recycle(&mut self, packed: Vec<u8>) {
        match self.ahead.as_mut() {
            Some(ahead) if ahead.spare.len() < 2 => ahead.spare.push(packed),
            _ => self.encoder.spare = packed,
        }
    }
}

impl PublisherBackend for RedisStreamBackend {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn publish(&mut self, events: &[OutboxEvent]) -> Result<Vec<Outcome>, BatchError> {
        let events = Arc::new(events.to_vec());
        self.send(&events)?;
        self.receive()
    }

    fn health_check(&mut self) -> Result<(), BatchError> {
        self.with_connection(|c| redis::cmd("PING").query::<String>(c).map(drop))
    }

    /// A key's entries all go to one stream in one transaction, or through the script that
    /// stops a key at its first failure.
    fn keeps_key_order(&self) -> bool {
        true
    }

    fn pipelined(&mut self) -> Option<&mut dyn Pipelined> {
        Some(self)
    }
}

impl Pipelined for RedisStreamBackend {
    fn send(&mut self, events: &Arc<Vec<OutboxEvent>>) -> Result<(), BatchError> {
        // Connect first: how entries are written depends on the server's version.
        self.connection()?;
        let Encoded {
            shape,
            outcome,
            sent,
            packed,
            ..
        } = self.encoded(events);
        if !sent.is_empty() {
            if let Err(e) = self.with_connection(|c| c.send_packed_command(&packed)) {
                self.recycle(packed);
                return Err(e);
            }
        }
        self.in_flight = Some(InFlight {
            shape,
            outcome,
            sent,
            packed,
        });
        Ok(())
    }

    fn receive(&mut self) -> Result<Vec<Outcome>, BatchError> {
        let Some(InFlight {
            shape,
            mut outcome,
            sent,
            packed,
        }) = self.in_flight.take()
        else {
            return Err(BatchError::Unavailable("no batch was sent".into()));
        };
        if sent.is_empty() {
            self.recycle(packed);
            return Ok(outcome);
        }
        let replies = self.with_connection(|c| match shape {
            Shape::Transaction => receive_transaction_replies(c, sent.len()),
            Shape::Script => receive_script_reply(c, &packed)
                .and_then(|reply| script_outcomes(reply, sent.len())),
        });
        self.recycle(packed);
        let replies = match replies {
            Ok(Ok(replies)) => replies,
            Ok(Err(e)) | Err(e) => {
                // Replies may be left unread or out of step: start on a new connection.
                self.connection = None;
                return Err(e);
            }
        };
        for (i, reply) in sent.into_iter().zip(replies) {
            outcome[i] = reply;
        }
        Ok(outcome)
    }

    fn prepare(&mut self, next: &Arc<Vec<OutboxEvent>>) {
        let encoded = match self.ahead.as_mut() {
            Some(ahead) => ahead.prepare(next),
            None => None,
        };
        self.prepared = encoded.map(|encoded| (Arc::clone(next), encoded));
    }
}
