//! Redis Streams backend: one `XADD` per event, a whole batch in one `MULTI`/`EXEC` round trip
//! (or one call of `batch.lua` when a key's events go to several streams). The entry layout
//! follows the CloudEvents Kafka binding (binary mode) or carries the whole event as JSON
//! (structured mode).
//!
//! - `config.rs`: its options;
//! - `cluster.rs`: a Redis Cluster's batches, split by hash slot;
//! - `encode.rs`: events into entries, batches into commands;
//! - `reply.rs`: replies into outcomes, errors into outages or rejections;
//! - `batch.lua`: the script.

use std::sync::{mpsc, Arc};

use redis::{Connection, ConnectionInfo, RedisError};

use super::{Backend, BatchError, Outcome, Pipelined, PublisherBackend, TlsFiles};
use crate::event::OutboxEvent;

mod cluster;
mod config;
mod encode;
mod reply;
mod sentinel;
#[cfg(test)]
mod tests;

pub use cluster::slot;
use cluster::ClusterRouter;
pub use config::RedisConfig;
pub use encode::STRUCTURED_CONTENT_TYPE;
use encode::{AheadEncoder, Dialect, Encoded, Encoder, Shape};
use reply::{classify, receive_script_reply, receive_transaction_replies, script_outcomes};
pub use sentinel::SentinelUrl;

/// How often the consumer groups of trimmed streams are looked at, at most.
const TRIM_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
/// Most streams looked at each time.
const TRIM_WATCH_STREAMS: usize = 64;

pub struct RedisStreamBackend {
    /// The `url` option's servers, in order: one, or a cluster's seed nodes.
    seeds: Vec<ConnectionInfo>,
    /// A `redis+sentinel://` URL, and the `tls_*_file` certificates: the primary is asked of
    /// the sentinels at each connect.
    sentinel: Option<(SentinelUrl, Option<redis::TlsCertificates>)>,
    connection: Option<Connection>,
    /// The server `connection` is to: a seed, or the primary the sentinels named.
    connected_to: Option<ConnectionInfo>,
    /// The longest argument minus one that the server was seen to drop the connection on,
    /// where `CONFIG` would not tell its `proto-max-bulk-len` ([`Self::learn_from_drop`]).
    /// Kept until the relay restarts.
    learnt_max_bulk_len: Option<usize>,
    /// Set when the server connected to said it is a Redis Cluster node: then every batch goes
    /// through it, and `connection` stays None.
    cluster: Option<ClusterRouter>,
    /// What a cluster's batch sent by [`Pipelined::send`] came to.
    cluster_outcome: Option<Result<Vec<Outcome>, BatchError>>,
    /// What [`PublisherBackend::warning`] says of the memory policy, learnt on connect.
    warning: Option<String>,
    /// With `maxlen`: the streams written to (at most [`TRIM_WATCH_STREAMS`]; once full, it
    /// starts again with the next ones), when their consumer groups were last looked at, and
    /// what that found.
    trimmed_streams: std::collections::HashSet<String>,
    trim_checked: Option<std::time::Instant>,
    trim_warning: Option<String>,
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
    longest_arg: usize,
}

impl Backend for RedisStreamBackend {
    type Config = RedisConfig;

    fn new(config: RedisConfig) -> Result<Self, BatchError> {
        let files = TlsFiles::read(
            &config.tls_ca_file,
            &config.tls_cert_file,
            &config.tls_key_file,
        )?;
        let client_tls = files
            .identity
            .map(|(client_cert, client_key)| redis::ClientTlsConfig {
                client_cert,
                client_key,
            });
        let root_cert = files.ca;
        let certificates =
            (client_tls.is_some() || root_cert.is_some()).then_some(redis::TlsCertificates {
                client_tls,
                root_cert,
            });
        // The URL may hold a password: the error says what is wrong without repeating it.
        let url_error = |e: RedisError| {
            BatchError::Misconfigured(format!("not a valid Redis URL ({:?})", e.kind()))
        };
        let mut seeds = Vec::new();
        let mut sentinel = None;
        for url in config.seed_urls() {
            if let Some(parsed) = SentinelUrl::parse(url) {
                sentinel = Some(parsed.map_err(BatchError::Misconfigured)?);
                continue;
            }
            seeds.push(sentinel::connection_info(url, certificates.as_ref()).map_err(url_error)?);
        }
        if let Some(sentinel) = &sentinel {
            sentinel
                .check_certificates(certificates.as_ref())
                .map_err(BatchError::Misconfigured)?;
        }
        let mut backend = RedisStreamBackend::with_seeds(seeds, &config);
        backend.sentinel = sentinel.map(|sentinel| (sentinel, certificates));
        Ok(backend)
    }
}

impl RedisStreamBackend {
    fn with_seeds(seeds: Vec<ConnectionInfo>, config: &RedisConfig) -> Self {
        RedisStreamBackend {
            seeds,
            sentinel: None,
            connection: None,
            connected_to: None,
            learnt_max_bulk_len: None,
            cluster: None,
            cluster_outcome: None,
            warning: None,
            trimmed_streams: std::collections::HashSet::new(),
            trim_checked: None,
            trim_warning: None,
            encoder: Encoder::new(config),
            ahead: AheadEncoder::start(config),
            prepared: None,
            in_flight: None,
        }
    }

    /// Connects to the first seed that answers and learns what it takes (`INFO`, and
    /// `CONFIG GET proto-max-bulk-len` where `CONFIG` is allowed). A Redis Cluster node makes
    /// this backend route through a [`ClusterRouter`] from then on.
    fn connect(&mut self) -> Result<(), BatchError> {
        let timeout = self.read_timeout();
        let mut last_error = None;
        let candidates = match &self.sentinel {
            Some((sentinel, certificates)) => vec![sentinel
                .primary(self.encoder.config.timeout, certificates.as_ref())
                .map_err(BatchError::Unavailable)?],
            None => self.seeds.clone(),
        };
        for seed in candidates {
            let connected = cluster::connect(seed.clone(), timeout).and_then(|mut c| {
                let (info, max_bulk_len) = reply::probe(&mut c)?;
                Ok((c, info, max_bulk_len))
            });
            match connected {
                Ok((c, info, max_bulk_len)) => {
                    self.learn(&info, max_bulk_len);
                    if reply::info_field(&info, "cluster_enabled") == Some("1") {
                        let node = cluster::node_of(&seed).ok_or_else(|| {
                            BatchError::Misconfigured(
                                "a Redis Cluster is reached over TCP, not a Unix socket".into(),
                            )
                        })?;
                        self.cluster = Some(ClusterRouter::new(
                            self.seeds.clone(),
                            (node, c, self.encoder.dialect),
                            timeout,
                        ));
                    } else {
                        self.connection = Some(c);
                        self.connected_to = Some(seed);
                    }
                    return Ok(());
                }
                Err(e) => last_error = Some(classify(e)),
            }
        }
        Err(last_error.unwrap_or_else(|| BatchError::Misconfigured("no Redis URL".into())))
    }

    /// Bound on waiting for a reply: the network timeout, and `WAIT`'s own when it is asked.
    fn read_timeout(&self) -> std::time::Duration {
        let config = &self.encoder.config;
        if config.wait_replicas > 0 {
            config.timeout + config.wait_timeout
        } else {
            config.timeout
        }
    }

    /// Takes what `INFO` said (and `proto-max-bulk-len`, when the server told it) into the
    /// encoder, and whether the server may evict the streams into [`Self::warning`].
    fn learn(&mut self, info: &str, max_bulk_len: Option<usize>) {
        self.encoder.dialect =
            Dialect::of(info, max_bulk_len).with_learnt_max_bulk_len(self.learnt_max_bulk_len);
        self.warning = reply::info_field(info, "maxmemory_policy")
            .filter(|policy| reply::evicts_streams(policy))
            .map(|policy| format!(
                "the Redis server's maxmemory-policy is {policy}: once it reaches maxmemory it may delete a whole stream, entries no consumer has read included; set it to noeviction"
            ));
    }

    fn connection(&mut self) -> Result<&mut Connection, BatchError> {
        if self.connection.is_none() && self.cluster.is_none() {
            self.connect()?;
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
        let dialect = self.encoder.dialect;
        if let Some(ahead) = self.ahead.as_mut() {
            ahead.dialect = dialect;
        }
        self.prepared
            .take()
            .filter(|(prepared, _)| Arc::ptr_eq(prepared, events))
            .and_then(|(_, encoded)| encoded.recv().ok())
            .filter(|e| e.dialect == dialect && e.outcome.len() == events.len())
            .unwrap_or_else(|| self.encoder.encode(events))
    }

    /// Notes the streams of `events`, whose consumer groups [`Self::check_trimming`] looks at.
    fn watch_trimming(&mut self, events: &[OutboxEvent]) {
        for event in events {
            if self.trimmed_streams.len() >= TRIM_WATCH_STREAMS {
                break;
            }
            let stream = event
                .stream
                .as_deref()
                .unwrap_or(&self.encoder.config.stream);
            if !self.trimmed_streams.contains(stream) {
                self.trimmed_streams.insert(stream.to_string());
            }
        }
    }

    /// With `maxlen`, at most every [`TRIM_CHECK_EVERY`]: whether trimming removed entries a
    /// consumer group of a watched stream had not read yet
    /// ([`reply::trimmed_unread`]); kept in [`PublisherBackend::warning`] until a look finds
    /// none. A server that can't say (before Redis 7.0, or `XINFO` refused) says nothing.
    fn check_trimming(&mut self) {
        if self.encoder.config.maxlen == 0
            || self.trimmed_streams.is_empty()
            || self
                .trim_checked
                .is_some_and(|t| t.elapsed() < TRIM_CHECK_EVERY)
        {
            return;
        }
        self.trim_checked = Some(std::time::Instant::now());
        let mut streams: Vec<&String> = self.trimmed_streams.iter().collect();
        // The same stream named each time while it lasts: the warning is logged when it changes.
        streams.sort();
        let mut found = None;
        for stream in streams {
            // On a cluster, asked of the node that serves the stream.
            let c = match (self.cluster.as_mut(), self.connection.as_mut()) {
                (Some(cluster), _) => cluster.node_of_key(stream),
                (None, c) => c,
            };
            let Some(c) = c else {
                return;
            };
            match reply::trimmed_unread(c, stream) {
                Ok(Some(group)) => {
                    found = Some(format!(
                        "MAXLEN {} trimmed entries of stream {stream} that consumer group {group} had not read; raise the maxlen or read faster",
                        self.encoder.config.maxlen
                    ));
                    break;
                }
                Ok(None) => {}
                // The server stopped answering: the next batch will say so; keep what was found.
                Err(_) => return,
            }
        }
        self.trim_warning = found;
        if self.trimmed_streams.len() >= TRIM_WATCH_STREAMS {
            // Full: watch the streams written from now on.
            self.trimmed_streams.clear();
        }
    }

    /// After a batch whose longest argument is `longest` bytes failed as an outage: where the
    /// server's `proto-max-bulk-len` is unknown and the argument could be over it, asks the
    /// server whether it refuses an argument that long ([`reply::refuses_argument`]). If so,
    /// the limit is learnt, so that the entry is refused the next time it is encoded, charged
    /// an attempt with an error that names its size, instead of holding its key (and, retried
    /// as an outage, every other) forever.
    fn learn_from_drop(&mut self, longest: usize) {
        let dialect = self.encoder.dialect;
        if dialect.max_bulk_len_told
            || longest <= reply::MIN_MAX_BULK_LEN
            || longest > dialect.max_bulk_len
        {
            return;
        }
        let Some(info) = self.connected_to.clone() else {
            return;
        };
        if reply::refuses_argument(&info, longest, self.encoder.config.timeout) == Some(true) {
            let learnt = longest - 1;
            self.learnt_max_bulk_len = Some(self.learnt_max_bulk_len.unwrap_or(learnt).min(learnt));
            self.encoder.dialect = dialect.with_learnt_max_bulk_len(self.learnt_max_bulk_len);
        }
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
        if self.connection.is_none() && self.cluster.is_none() {
            self.connect()?;
        }
        match self.cluster.as_mut() {
            Some(cluster) => {
                cluster.health_check()?;
                self.check_trimming();
                Ok(())
            }
            None => {
                self.with_connection(|c| redis::cmd("PING").query::<String>(c).map(drop))?;
                self.check_trimming();
                Ok(())
            }
        }
    }

    /// A key's entries all go to one stream in one transaction, or through the script that
    /// stops a key at its first failure.
    fn keeps_key_order(&self) -> bool {
        true
    }

    fn warning(&self) -> Option<String> {
        match (&self.warning, &self.trim_warning) {
            (Some(a), Some(b)) => Some(format!("{a}; {b}")),
            (a, b) => a.clone().or_else(|| b.clone()),
        }
    }

    fn pipelined(&mut self) -> Option<&mut dyn Pipelined> {
        Some(self)
    }
}

impl Pipelined for RedisStreamBackend {
    fn send(&mut self, events: &Arc<Vec<OutboxEvent>>) -> Result<(), BatchError> {
        // Connect first: how entries are written depends on the server's version.
        if self.connection.is_none() && self.cluster.is_none() {
            self.connect()?;
        }
        if let Some(cluster) = self.cluster.as_mut() {
            // A cluster's batch goes out and comes back here: its slots' replies, redirects
            // and WAITs interleave across nodes.
            let config = &self.encoder.config;
            let wait =
                (config.wait_replicas > 0).then_some((config.wait_replicas, config.wait_timeout));
            self.prepared = None;
            self.cluster_outcome = Some(cluster.publish(&mut self.encoder, events, wait));
            if self.encoder.config.maxlen > 0 {
                self.watch_trimming(events);
                self.check_trimming();
            }
            return Ok(());
        }
        if self.encoder.config.maxlen > 0 {
            self.watch_trimming(events);
        }
        let Encoded {
            shape,
            outcome,
            sent,
            packed,
            longest_arg,
            ..
        } = self.encoded(events);
        if !sent.is_empty() {
            if let Err(e) = self.with_connection(|c| c.send_packed_command(&packed)) {
                self.recycle(packed);
                self.learn_from_drop(longest_arg);
                return Err(e);
            }
        }
        self.in_flight = Some(InFlight {
            shape,
            outcome,
            sent,
            packed,
            longest_arg,
        });
        Ok(())
    }

    fn receive(&mut self) -> Result<Vec<Outcome>, BatchError> {
        if let Some(outcome) = self.cluster_outcome.take() {
            return outcome;
        }
        let Some(InFlight {
            shape,
            mut outcome,
            sent,
            packed,
            longest_arg,
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
            Shape::Script => receive_script_reply(c, &packed, true)
                .and_then(|reply| script_outcomes(reply, sent.len())),
        });
        self.recycle(packed);
        let replies = match replies {
            // A demoted primary (a failover under way or done): the next connection finds the
            // new one (through the sentinels, with a sentinel URL).
            Ok(Ok(replies)) if replies.iter().any(reply::says_not_primary) => {
                self.connection = None;
                replies
            }
            Ok(Ok(replies)) => replies,
            Ok(Err(e)) | Err(e) => {
                // Replies may be left unread or out of step: start on a new connection.
                self.connection = None;
                self.learn_from_drop(longest_arg);
                return Err(e);
            }
        };
        let delivered = replies.contains(&Outcome::Delivered);
        for (i, reply) in sent.into_iter().zip(replies) {
            outcome[i] = reply;
        }
        self.check_trimming();
        if delivered && self.encoder.config.wait_replicas > 0 {
            let (replicas, timeout) = (
                self.encoder.config.wait_replicas,
                self.encoder.config.wait_timeout,
            );
            let acknowledged = match self.connection.as_mut() {
                Some(c) => reply::wait(c, replicas, timeout),
                None => Err("the connection is gone".into()),
            };
            if let Err(why) = acknowledged {
                for o in outcome.iter_mut().filter(|o| **o == Outcome::Delivered) {
                    *o = Outcome::Deferred(why.clone());
                }
            }
        }
        Ok(outcome)
    }

    fn prepare(&mut self, next: &Arc<Vec<OutboxEvent>>) {
        if self.cluster.is_some() {
            return;
        }
        let encoded = match self.ahead.as_mut() {
            Some(ahead) => ahead.prepare(next),
            None => None,
        };
        self.prepared = encoded.map(|encoded| (Arc::clone(next), encoded));
    }
}
