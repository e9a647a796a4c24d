//! Redis Cluster: a batch split by hash slot, each slot's entries sent atomically (the same
//! `MULTI`/`EXEC` or batch script as for a single server) to the primary that serves the slot,
//! every node's share written before any reply is read, so that the nodes work in parallel.
//!
//! - The slot map comes from `CLUSTER SLOTS`, asked of any node that answers (the seeds first).
//! - `MOVED` updates the map and resends the slot's entries to the node named; `ASK` resends
//!   them there once, after `ASKING`. A redirected group was not written (Redis checks the slot
//!   before it queues or runs anything), so resending can't duplicate it.
//! - A node that can't be reached, `CLUSTERDOWN`, `TRYAGAIN` and a replica's `READONLY` defer
//!   that node's events (an outage), never charge them an attempt; the map is asked again
//!   before the next batch.
//! - A partition key's events go out in rounds: within a round, all of a key's events are in
//!   one slot, so the slot's transaction or script keeps their order; a key whose events go to
//!   streams in several slots continues in the next round, and only if the round delivered all
//!   of it.
//!
//! The slot of a stream is CRC16 (XMODEM) of its name, or of the part between the first `{`
//! and the next `}` when that is not empty (a hash tag), modulo 16384: the Redis Cluster
//! specification, "Keys distribution model".

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use redis::{Client, Connection, ConnectionAddr, ConnectionInfo, RedisError, Value};

use super::encode::{Dialect, Encoded, Encoder, Shape, BATCH_SCRIPT};
use super::reply::{receive_script_reply, receive_transaction_replies, script_outcomes};
use crate::backend::{BatchError, Outcome};
use crate::event::OutboxEvent;

/// Hash slots in a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// How many times one batch follows `MOVED` or `ASK` before its events wait for the next try.
const MAX_REDIRECTS: usize = 5;

/// The hash slot of `key` (a stream name): CRC16 of the key or of its hash tag, modulo 16384.
pub fn slot(key: &[u8]) -> u16 {
    crc16::State::<crc16::XMODEM>::calculate(hash_tag(key)) % SLOTS
}

/// The part of `key` that is hashed: between the first `{` and the next `}`, when that is not
/// empty; else the whole key.
fn hash_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        let rest = &key[open + 1..];
        if let Some(close) = rest.iter().position(|&b| b == b'}') {
            if close > 0 {
                return &rest[..close];
            }
        }
    }
    key
}

/// A node's address as `CLUSTER SLOTS`, `MOVED` and `ASK` give it.
type Node = (String, u16);

/// The connections to a cluster's primaries, and which serves each slot.
pub(super) struct ClusterRouter {
    /// How to reach the seeds (the `url` option's nodes), with their credentials and TLS;
    /// a node found through the cluster is reached the same way at its own address.
    seeds: Vec<ConnectionInfo>,
    /// For each slot, its primary's index in `nodes`; None while no node is known to serve it.
    slots: Vec<Option<usize>>,
    nodes: Vec<Node>,
    connections: HashMap<Node, Connection>,
    /// What each connected node takes (learnt when connecting to it: in a rolling upgrade the
    /// nodes differ).
    dialects: HashMap<Node, Dialect>,
    /// Per node, what [`Self::learn_from_drop`] learnt of its `proto-max-bulk-len`.
    learnt_max_bulk_len: HashMap<Node, usize>,
    /// Nodes asked about their limit during the current batch: once each, as a node within
    /// its limit makes the probe wait for the timeout.
    probed: HashSet<Node>,
    /// Nodes whose connection failed during the current batch: not connected to again before
    /// the next one, so that a dead node costs one timeout per batch, and no group is read
    /// from, or `WAIT` asked on, a connection other than the one it was written on.
    lost: HashSet<Node>,
    /// The map is asked for again before the next batch.
    stale: bool,
    timeout: Duration,
}

/// One slot's events in one round, and where they go.
struct Group {
    slot: u16,
    /// Indexes into the batch, in order.
    events: Vec<usize>,
    node: Node,
    /// Sent after `ASKING` (to the node importing the slot).
    asking: bool,
}

/// What a group's replies said.
enum Answer {
    Outcomes(Vec<Outcome>),
    /// `MOVED` (`asking` false) or `ASK` (true): send the group to this node.
    Redirect {
        node: Node,
        asking: bool,
    },
}

impl ClusterRouter {
    /// A router for the cluster `seeds` belong to; `first` is the connection to the seed that
    /// said it is a cluster node, and what that node takes.
    pub(super) fn new(
        seeds: Vec<ConnectionInfo>,
        first: (Node, Connection, Dialect),
        timeout: Duration,
    ) -> Self {
        let mut router = ClusterRouter {
            seeds,
            slots: vec![None; usize::from(SLOTS)],
            nodes: Vec::new(),
            connections: HashMap::new(),
            dialects: HashMap::new(),
            learnt_max_bulk_len: HashMap::new(),
            probed: HashSet::new(),
            lost: HashSet::new(),
            stale: true,
            timeout,
        };
        let (node, mut c, dialect) = first;
        // As every node connected later: the batch script loaded before any batch.
        if BATCH_SCRIPT.load(&mut c).is_ok() {
            router.connections.insert(node.clone(), c);
            router.dialects.insert(node, dialect);
        }
        router
    }

    /// Asks a node for the slot map: the connected ones first, then the seeds.
    fn refresh(&mut self) -> Result<(), BatchError> {
        let mut last_error = String::from("no node to ask");
        let known: Vec<Node> = self.connections.keys().cloned().collect();
        let seeds: Vec<Node> = self.seeds.iter().filter_map(node_of).collect();
        for node in known.into_iter().chain(seeds) {
            let map = self
                .connection(&node)
                .and_then(|c| redis::cmd("CLUSTER").arg("SLOTS").query::<Value>(c))
                .map_err(|e| e.to_string())
                .and_then(|reply| parse_slots(reply, &node.0));
            match map {
                Ok(ranges) if !ranges.is_empty() => {
                    self.install(ranges);
                    return Ok(());
                }
                Ok(_) => last_error = format!("{}:{} serves no slot", node.0, node.1),
                Err(e) => {
                    self.connections.remove(&node);
                    self.lost.insert(node);
                    last_error = e;
                }
            }
        }
        Err(BatchError::Unavailable(format!(
            "no cluster node gave its slot map: {last_error}"
        )))
    }

    fn install(&mut self, ranges: Vec<(u16, u16, Node)>) {
        self.slots.iter_mut().for_each(|s| *s = None);
        self.nodes.clear();
        for (start, end, node) in ranges {
            let index = self.node_index(node);
            for slot in start..=end.min(SLOTS - 1) {
                self.slots[usize::from(slot)] = Some(index);
            }
        }
        // Connections to nodes that serve nothing now (a former primary) are closed.
        let nodes: HashSet<&Node> = self.nodes.iter().collect();
        self.connections.retain(|node, _| nodes.contains(node));
        self.dialects.retain(|node, _| nodes.contains(node));
        self.stale = false;
    }

    fn node_index(&mut self, node: Node) -> usize {
        match self.nodes.iter().position(|n| *n == node) {
            Some(i) => i,
            None => {
                self.nodes.push(node);
                self.nodes.len() - 1
            }
        }
    }

    /// The connection to `node`, opened with the seeds' credentials and TLS if there is none
    /// (and the node was not lost during this batch); a new one learns what the node takes and
    /// loads the batch script, so that no `NOSCRIPT` reload ever interleaves with pipelined
    /// groups.
    fn connection(&mut self, node: &Node) -> Result<&mut Connection, RedisError> {
        if self.lost.contains(node) {
            return Err(RedisError::from((
                redis::ErrorKind::Io,
                "lost earlier in this batch",
            )));
        }
        if !self.connections.contains_key(node) {
            let mut c = connect(self.node_info(node)?, self.timeout)?;
            let (info, max_bulk_len) = super::reply::probe(&mut c)?;
            BATCH_SCRIPT.load(&mut c)?;
            let learnt = self.learnt_max_bulk_len.get(node).copied();
            self.dialects.insert(
                node.clone(),
                Dialect::of(&info, max_bulk_len).with_learnt_max_bulk_len(learnt),
            );
            self.connections.insert(node.clone(), c);
        }
        self.connections
            .get_mut(node)
            .ok_or_else(|| RedisError::from((redis::ErrorKind::Io, "the connection is gone")))
    }

    /// How to reach `node`: as the first seed is reached (credentials, TLS), at its address.
    fn node_info(&self, node: &Node) -> Result<ConnectionInfo, RedisError> {
        let seed = self.seeds.first().cloned().ok_or_else(|| {
            RedisError::from((redis::ErrorKind::InvalidClientConfig, "no seed node"))
        })?;
        let addr = match seed.addr() {
            ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => ConnectionAddr::TcpTls {
                host: node.0.clone(),
                port: node.1,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => ConnectionAddr::Tcp(node.0.clone(), node.1),
        };
        Ok(seed.set_addr(addr))
    }

    /// After `node` dropped a group whose longest argument is `longest` bytes: as
    /// [`super::RedisStreamBackend`] does for one server, asks the node whether it refuses an
    /// argument that long where its limit is unknown, and learns the limit if so.
    fn learn_from_drop(&mut self, node: &Node, longest: usize) {
        let Some(dialect) = self.dialects.get(node).copied() else {
            return;
        };
        if dialect.max_bulk_len_told
            || longest <= super::reply::MIN_MAX_BULK_LEN
            || longest > dialect.max_bulk_len
        {
            return;
        }
        if !self.probed.insert(node.clone()) {
            return;
        }
        let Ok(info) = self.node_info(node) else {
            return;
        };
        if super::reply::refuses_argument(&info, longest, self.timeout) == Some(true) {
            let learnt = self
                .learnt_max_bulk_len
                .entry(node.clone())
                .or_insert(longest - 1);
            *learnt = (*learnt).min(longest - 1);
            let learnt = Some(*learnt);
            self.dialects
                .insert(node.clone(), dialect.with_learnt_max_bulk_len(learnt));
        }
    }

    /// Publishes `events`: one outcome per event, in order. Err only when no slot map can be
    /// had; a node's trouble defers that node's events.
    pub(super) fn publish(
        &mut self,
        encoder: &mut Encoder,
        events: &[OutboxEvent],
        wait: Option<(u32, Duration)>,
    ) -> Result<Vec<Outcome>, BatchError> {
        self.lost.clear();
        self.probed.clear();
        if self.stale {
            self.refresh()?;
        }
        let slots: Vec<u16> = events
            .iter()
            .map(|e| {
                slot(
                    e.stream
                        .as_deref()
                        .unwrap_or(&encoder.config.stream)
                        .as_bytes(),
                )
            })
            .collect();
        let rounds = rounds(events, &slots);
        let mut outcome = vec![Outcome::NotSent; events.len()];
        let mut failed: HashSet<&str> = HashSet::new();
        for round in 0..=rounds.iter().copied().max().unwrap_or(0) {
            let mut by_slot: Vec<(u16, Vec<usize>)> = Vec::new();
            for (i, event) in events.iter().enumerate() {
                let key = event.partition_key.as_deref();
                if rounds[i] != round || key.is_some_and(|k| failed.contains(k)) {
                    continue;
                }
                match by_slot.iter_mut().find(|(s, _)| *s == slots[i]) {
                    Some((_, group)) => group.push(i),
                    None => by_slot.push((slots[i], vec![i])),
                }
            }
            let mut groups = Vec::with_capacity(by_slot.len());
            for (slot, members) in by_slot {
                match self.slots[usize::from(slot)] {
                    Some(node) => groups.push(Group {
                        slot,
                        events: members,
                        node: self.nodes[node].clone(),
                        asking: false,
                    }),
                    None => {
                        self.stale = true;
                        for i in members {
                            outcome[i] = Outcome::Deferred(format!("no node serves slot {slot}"));
                        }
                    }
                }
            }
            self.send_groups(encoder, events, groups, wait, &mut outcome);
            for (i, event) in events.iter().enumerate() {
                if rounds[i] == round && outcome[i] != Outcome::Delivered {
                    failed.extend(event.partition_key.as_deref());
                }
            }
        }
        Ok(outcome)
    }

    /// Sends every group to its node, all writes before any read, then reads the replies,
    /// following redirects; writes each event's outcome.
    fn send_groups(
        &mut self,
        encoder: &mut Encoder,
        events: &[OutboxEvent],
        mut groups: Vec<Group>,
        wait: Option<(u32, Duration)>,
        outcome: &mut [Outcome],
    ) {
        for _ in 0..=MAX_REDIRECTS {
            if groups.is_empty() {
                return;
            }
            // Write: each group's command on its node's connection, in order.
            let mut written: Vec<(Group, Encoded)> = Vec::with_capacity(groups.len());
            for group in groups.drain(..) {
                // Connected first: how entries are written depends on the node.
                if let Err(e) = self.connection(&group.node) {
                    self.node_lost(&group.node, &group.events, &e.to_string(), outcome);
                    continue;
                }
                if let Some(dialect) = self.dialects.get(&group.node) {
                    encoder.dialect = *dialect;
                }
                let batch: Vec<OutboxEvent> =
                    group.events.iter().map(|&i| events[i].clone()).collect();
                let encoded = encoder.encode(&batch);
                for (k, &i) in group.events.iter().enumerate() {
                    outcome[i] = encoded.outcome[k].clone();
                }
                if encoded.sent.is_empty() {
                    continue;
                }
                let sent = self.connection(&group.node).and_then(|c| {
                    if group.asking {
                        c.send_packed_command(&redis::cmd("ASKING").get_packed_command())?;
                    }
                    c.send_packed_command(&encoded.packed)
                });
                match sent {
                    Ok(()) => written.push((group, encoded)),
                    Err(e) => {
                        self.node_lost(&group.node, &group.events, &e.to_string(), outcome);
                        self.learn_from_drop(&group.node, encoded.longest_arg);
                    }
                }
            }
            // Read, in the order written: a connection's replies come in that order.
            let mut delivered: HashMap<Node, Vec<usize>> = HashMap::new();
            for (group, encoded) in written {
                if self.lost.contains(&group.node) {
                    // Lost while writing or reading another group of the node: perhaps for
                    // this group's argument, written first.
                    self.node_lost(&group.node, &group.events, "connection lost", outcome);
                    self.learn_from_drop(&group.node, encoded.longest_arg);
                    continue;
                }
                match self.receive(&group, &encoded) {
                    Ok(Answer::Outcomes(replies)) => {
                        let on_node = delivered.entry(group.node.clone()).or_default();
                        for (&k, reply) in encoded.sent.iter().zip(replies) {
                            if is_stale_map(&reply) {
                                self.stale = true;
                            }
                            if reply == Outcome::Delivered {
                                on_node.push(group.events[k]);
                            }
                            outcome[group.events[k]] = reply;
                        }
                    }
                    Ok(Answer::Redirect { node, asking }) => {
                        if !asking {
                            // The map is behind: the slot moved. Asked again before the next
                            // batch; this one follows the redirect now.
                            let index = self.node_index(node.clone());
                            self.slots[usize::from(group.slot)] = Some(index);
                            self.stale = true;
                        }
                        for &i in &group.events {
                            outcome[i] =
                                Outcome::Deferred(format!("slot {} is moving", group.slot));
                        }
                        groups.push(Group {
                            node,
                            asking,
                            ..group
                        });
                    }
                    Err(e) => {
                        self.node_lost(&group.node, &group.events, &e, outcome);
                        self.learn_from_drop(&group.node, encoded.longest_arg);
                    }
                }
            }
            if let Some((replicas, timeout)) = wait {
                for (node, members) in delivered {
                    let acknowledged = self
                        .connection(&node)
                        .map_err(|e| e.to_string())
                        .and_then(|c| super::reply::wait(c, replicas, timeout));
                    if let Err(e) = acknowledged {
                        self.node_lost(&node, &members, &e, outcome);
                    }
                }
            }
        }
    }

    /// Reads the replies to one group's command (after `ASKING`'s, if sent). Err: the node's
    /// connection can't be trusted any more.
    fn receive(&mut self, group: &Group, encoded: &Encoded) -> Result<Answer, String> {
        let c = self.connection(&group.node).map_err(|e| e.to_string())?;
        if group.asking {
            c.recv_response()
                .and_then(Value::extract_error)
                .map_err(|e| e.to_string())?;
        }
        let replies = match encoded.shape {
            Shape::Transaction => receive_transaction_replies(c, encoded.sent.len()),
            // Loaded when connecting: a NOSCRIPT now (a flushed cache) is an outage of the node,
            // whose next connection loads it again.
            Shape::Script => match receive_script_reply(c, &encoded.packed, false) {
                Ok(reply) => script_outcomes(reply, encoded.sent.len()),
                Err(e) => {
                    return match e.redirect_node().and_then(|(addr, _)| parse_node(addr)) {
                        Some(node) => Ok(Answer::Redirect {
                            node,
                            asking: e.kind()
                                == redis::ErrorKind::Server(redis::ServerErrorKind::Ask),
                        }),
                        None => Err(e.to_string()),
                    }
                }
            },
        };
        let replies = match replies {
            Ok(Ok(replies)) => replies,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(e) => return Err(e.to_string()),
        };
        // A transaction's entries refused while queued: `MOVED` or `ASK` for the slot.
        if let Some(redirect) = replies.iter().find_map(redirect_of) {
            return Ok(redirect);
        }
        Ok(Answer::Outcomes(replies))
    }

    /// `node` can't be reached: its connection is dropped, the map asked again before the next
    /// batch, and the events `members` deferred.
    fn node_lost(&mut self, node: &Node, members: &[usize], why: &str, outcome: &mut [Outcome]) {
        self.connections.remove(node);
        self.lost.insert(node.clone());
        self.stale = true;
        for &i in members {
            outcome[i] = Outcome::Deferred(format!("cluster node {}:{}: {why}", node.0, node.1));
        }
    }

    /// The connection to the primary serving `key`'s slot, as the map has it; None when no
    /// node is known to serve it or it can't be reached.
    pub(super) fn node_of_key(&mut self, key: &str) -> Option<&mut Connection> {
        let node = self
            .nodes
            .get(self.slots[usize::from(slot(key.as_bytes()))]?)?
            .clone();
        self.connection(&node).ok()
    }

    /// `PING` to every primary in the map.
    pub(super) fn health_check(&mut self) -> Result<(), BatchError> {
        self.lost.clear();
        if self.stale {
            self.refresh()?;
        }
        for node in self.nodes.clone() {
            self.connection(&node)
                .and_then(|c| redis::cmd("PING").query::<String>(c))
                .map_err(|e| {
                    self.stale = true;
                    BatchError::Unavailable(format!("cluster node {}:{}: {e}", node.0, node.1))
                })?;
        }
        Ok(())
    }
}

/// Opens a connection with every network operation bounded by `timeout`.
pub(super) fn connect(info: ConnectionInfo, timeout: Duration) -> Result<Connection, RedisError> {
    let c = Client::open(info)?.get_connection_with_timeout(timeout)?;
    c.set_read_timeout(Some(timeout))?;
    c.set_write_timeout(Some(timeout))?;
    Ok(c)
}

/// A seed's `(host, port)`.
pub(super) fn node_of(info: &ConnectionInfo) -> Option<Node> {
    match info.addr() {
        ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
            Some((host.clone(), *port))
        }
        _ => None,
    }
}

/// `host:port` (a `MOVED` or `ASK` target; the host may be an IPv6 address).
fn parse_node(addr: &str) -> Option<Node> {
    let (host, port) = addr.rsplit_once(':')?;
    Some((host.to_string(), port.parse().ok()?))
}

/// The redirect a refused entry's reason names, if it is `MOVED <slot> <addr>` or
/// `ASK <slot> <addr>`.
fn redirect_of(outcome: &Outcome) -> Option<Answer> {
    let (Outcome::Rejected(message) | Outcome::Deferred(message)) = outcome else {
        return None;
    };
    let mut words = message.split_ascii_whitespace();
    let asking = match words.next()? {
        "MOVED" => false,
        "ASK" => true,
        _ => return None,
    };
    let _slot = words.next()?;
    Some(Answer::Redirect {
        node: parse_node(words.next()?)?,
        asking,
    })
}

/// Whether an entry's outcome says the slot map changed under us: a failover in progress, or a
/// node that is now a replica.
fn is_stale_map(outcome: &Outcome) -> bool {
    super::reply::says_not_primary(outcome)
        || matches!(outcome, Outcome::Deferred(m)
            if m.starts_with("CLUSTERDOWN") || m.starts_with("TRYAGAIN"))
}

/// The primaries' slot ranges from a `CLUSTER SLOTS` reply: `[start, end, [host, port, id,
/// ...], replicas ...]` per range. An empty host means the node asked (`asked`).
fn parse_slots(reply: Value, asked: &str) -> Result<Vec<(u16, u16, Node)>, String> {
    let unexpected = || format!("unexpected CLUSTER SLOTS reply: {reply:?}");
    let Value::Array(ranges) = &reply else {
        return Err(unexpected());
    };
    let mut out = Vec::with_capacity(ranges.len());
    for range in ranges {
        let Value::Array(fields) = range else {
            return Err(unexpected());
        };
        let int = |v: Option<&Value>| match v {
            Some(Value::Int(n)) => u16::try_from(*n).ok(),
            _ => None,
        };
        let (Some(start), Some(end), Some(Value::Array(primary))) =
            (int(fields.first()), int(fields.get(1)), fields.get(2))
        else {
            return Err(unexpected());
        };
        let host = match primary.first() {
            Some(v) => redis::from_redis_value_ref::<String>(v).map_err(|_| unexpected())?,
            None => return Err(unexpected()),
        };
        let host = if host.is_empty() || host == "?" {
            asked.to_string()
        } else {
            host
        };
        let port = int(primary.get(1)).ok_or_else(unexpected)?;
        out.push((start, end, (host, port)));
    }
    Ok(out)
}

/// The round of each event: a key's events stay in one round while they go to one slot, and
/// move to the next round when the slot changes. Events without a key are all in round 0.
fn rounds(events: &[OutboxEvent], slots: &[u16]) -> Vec<usize> {
    let mut last: HashMap<&str, (u16, usize)> = HashMap::new();
    events
        .iter()
        .zip(slots)
        .map(|(event, &slot)| {
            let Some(key) = event.partition_key.as_deref() else {
                return 0;
            };
            let round = match last.get(key) {
                Some(&(s, r)) if s == slot => r,
                Some(&(_, r)) => r + 1,
                None => 0,
            };
            last.insert(key, (slot, round));
            round
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_cluster_specification() {
        // Values from the specification and from `CLUSTER KEYSLOT` of Redis 7.0.
        assert_eq!(slot(b"123456789"), 0x31C3);
        assert_eq!(slot(b"payments"), 8507);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"));
        assert_ne!(slot(b"foo{}{bar}"), slot(b"bar"));
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
    }

    #[test]
    fn a_key_changing_slot_waits_for_the_next_round() {
        let event = |key: &str| OutboxEvent {
            partition_key: Some(key.into()),
            ..OutboxEvent::default()
        };
        let events = [event("a"), event("b"), event("a"), event("a"), event("b")];
        let slots = [1, 1, 2, 2, 1];
        assert_eq!(rounds(&events, &slots), vec![0, 0, 1, 1, 0]);
    }

    #[test]
    fn cluster_slots_replies_become_ranges() {
        let node = |host: &str, port: i64| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node("127.0.0.1", 7010),
                node("127.0.0.1", 7013),
            ]),
            // An empty host is the node that was asked.
            Value::Array(vec![Value::Int(5461), Value::Int(16383), node("", 7011)]),
        ]);
        assert_eq!(
            parse_slots(reply, "10.0.0.9").expect("parsed"),
            vec![
                (0, 5460, ("127.0.0.1".to_string(), 7010)),
                (5461, 16383, ("10.0.0.9".to_string(), 7011)),
            ]
        );
        assert!(parse_slots(Value::Int(1), "x").is_err());
    }

    #[test]
    fn moved_and_ask_name_the_node_other_refusals_do_not() {
        let target = |o: Outcome| match redirect_of(&o) {
            Some(Answer::Redirect { node, asking }) => Some((node, asking)),
            _ => None,
        };
        assert_eq!(
            target(Outcome::Rejected("MOVED 8507 127.0.0.1:7011".into())),
            Some((("127.0.0.1".to_string(), 7011), false))
        );
        assert_eq!(
            target(Outcome::Deferred("ASK 8507 ::1:7012".into())),
            Some((("::1".to_string(), 7012), true))
        );
        assert_eq!(target(Outcome::Rejected("WRONGTYPE x".into())), None);
        assert_eq!(target(Outcome::Delivered), None);
        assert!(is_stale_map(&Outcome::Deferred(
            "CLUSTERDOWN The cluster is down".into()
        )));
        assert!(!is_stale_map(&Outcome::Rejected("WRONGTYPE x".into())));
    }
}
