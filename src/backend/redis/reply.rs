//! The server's replies to a batch, read back as one outcome per event, and which errors are
//! the broker's (an outage: retry later) rather than the event's (a rejection).

use std::collections::HashMap;
use std::time::Duration;

use redis::{Connection, ConnectionInfo, ConnectionLike, RedisError};

use super::encode::BATCH_SCRIPT;
use crate::backend::{BatchError, Outcome};

/// Reads the reply to a packed `EVALSHA` already sent; when the server doesn't have the script (a
/// restarted or flushed server) and `reload`, loads it and sends the command again. Only with
/// nothing else sent behind it on the connection: the reload's replies would be taken for
/// another command's.
pub(super) fn receive_script_reply(
    c: &mut Connection,
    packed: &[u8],
    reload: bool,
) -> Result<redis::Value, RedisError> {
    match c.recv_response().and_then(redis::Value::extract_error) {
        Err(e)
            if reload && e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
        {
            BATCH_SCRIPT.load(c)?;
            c.req_packed_command(packed)?.extract_error()
        }
        other => other,
    }
}

/// What a server takes, asked right after connecting: `INFO` (all of it: the version, whether
/// it is a cluster node, its memory policy) and `proto-max-bulk-len` (None where `CONFIG` is
/// refused, as by an ACL or a managed service).
pub(super) fn probe(c: &mut Connection) -> Result<(String, Option<usize>), RedisError> {
    let info: String = redis::cmd("INFO").query(c)?;
    let max_bulk_len = redis::cmd("CONFIG")
        .arg("GET")
        .arg("proto-max-bulk-len")
        .query::<Vec<String>>(c)
        .ok()
        .and_then(|pair| pair.get(1).and_then(|v| v.parse().ok()));
    Ok((info, max_bulk_len))
}

/// Redis's lowest `proto-max-bulk-len`: its configuration refuses less than 1 MB, so every
/// server reads an argument this long.
pub(super) const MIN_MAX_BULK_LEN: usize = 1024 * 1024;

/// Whether the server at `info` refuses an argument of `len` bytes, asked on a new connection
/// with only the head of an `ECHO` of that many bytes (`*2 $4 ECHO $<len>`), no body. Where
/// `CONFIG GET proto-max-bulk-len` is refused, this is how an entry over the limit is told from
/// the server going down: over its limit, Redis answers `Protocol error: invalid bulk length`
/// as soon as it reads the length (and closes the connection, which is how the batch was
/// lost); within it, it waits for the body, and the read times out.
///
/// Some(true) only on that answer; Some(false) never (a server within its limit just waits);
/// None otherwise: can't tell (the server unreachable, slow, or gone). Bounded by `timeout`.
pub(super) fn refuses_argument(
    info: &ConnectionInfo,
    len: usize,
    timeout: Duration,
) -> Option<bool> {
    let mut c = super::cluster::connect(info.clone(), timeout).ok()?;
    c.send_packed_command(format!("*2\r\n$4\r\nECHO\r\n${len}\r\n").as_bytes())
        .ok()?;
    match c.recv_response().and_then(redis::Value::extract_error) {
        Err(e) if e.to_string().contains("invalid bulk length") => Some(true),
        _ => None,
    }
}

/// Per-entry outcomes of a batch sent as a transaction: the replies to `MULTI`, to each of the
/// `n` `XADD`s, and to `EXEC`. An `XADD` refused while queued (the server out of memory, say)
/// makes `EXEC` discard them all: that entry is answered with its error and the others are not
/// sent. The inner `Err` means the replies are not what was sent for.
pub(super) fn receive_transaction_replies(
    c: &mut Connection,
    n: usize,
) -> Result<Result<Vec<Outcome>, BatchError>, RedisError> {
    let in_transaction = matches!(c.recv_response()?, redis::Value::Okay);
    // While queued, each reply is `QUEUED` or why the entry was refused. Had `MULTI` itself
    // been refused, each `XADD` ran on its own: its reply is its outcome (and `EXEC` fails).
    let mut direct: Vec<Outcome> = Vec::new();
    let mut refused: Vec<(usize, Outcome)> = Vec::new();
    for i in 0..n {
        let reply = entry_outcome(c.recv_response()?);
        if !in_transaction {
            direct.push(reply);
        } else if reply != Outcome::Delivered {
            refused.push((i, reply));
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
            let mut outcome: Vec<Outcome> = vec![Outcome::NotSent; n];
            for (i, refusal) in refused {
                outcome[i] = refusal;
            }
            Ok(outcome)
        }
        // The batch as a whole, e.g. EXEC refused for lack of memory.
        redis::Value::ServerError(e) => Err(BatchError::Unavailable(server_error_message(&e))),
        other => Err(BatchError::Unavailable(format!(
            "unexpected reply to a batch of {n}: {other:?}"
        ))),
    })
}

/// Per-entry outcomes from the batch script's reply.
pub(super) fn script_outcomes(
    reply: redis::Value,
    n: usize,
) -> Result<Result<Vec<Outcome>, BatchError>, RedisError> {
    Ok(match reply {
        // Every entry added.
        redis::Value::Int(added) if usize::try_from(added) == Ok(n) => {
            Ok(vec![Outcome::Delivered; n])
        }
        redis::Value::Array(replies) if replies.len() == n => {
            Ok(replies.into_iter().map(script_entry_outcome).collect())
        }
        other => Err(BatchError::Unavailable(format!(
            "unexpected reply to a batch of {n}: {other:?}"
        ))),
    })
}

/// One entry's reply to `XADD`. Only an entry id counts as delivered.
pub(super) fn entry_outcome(reply: redis::Value) -> Outcome {
    match reply {
        redis::Value::BulkString(_) | redis::Value::SimpleString(_) => Outcome::Delivered,
        redis::Value::ServerError(e) => classify_message(server_error_message(&e)),
        other => Outcome::Deferred(format!("unexpected reply for an entry: {other:?}")),
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
pub(super) fn script_entry_outcome(reply: redis::Value) -> Outcome {
    let text = |v: &redis::Value| redis::from_redis_value_ref::<String>(v).ok();
    match reply {
        redis::Value::BulkString(_) | redis::Value::SimpleString(_) => Outcome::Delivered,
        redis::Value::Array(marker) => match marker.first().and_then(text).as_deref() {
            Some("HELD") => Outcome::NotSent,
            Some("ERR") => classify_message(
                marker
                    .get(1)
                    .and_then(text)
                    .unwrap_or_else(|| "unknown error".into()),
            ),
            _ => Outcome::Deferred(format!("unexpected reply for an entry: {marker:?}")),
        },
        other => Outcome::Deferred(format!("unexpected reply for an entry: {other:?}")),
    }
}

/// An error the server reported for one entry, as `CODE message`.
pub(super) fn classify_message(message: String) -> Outcome {
    let code = message.split_whitespace().next().unwrap_or_default();
    if is_outage(code, &message) {
        Outcome::Deferred(message)
    } else {
        Outcome::Rejected(message)
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

/// The value of `name:` in an `INFO` reply.
pub(super) fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(str::trim)
    })
}

/// Whether a `maxmemory-policy` may delete a key that has no expiry, such as a stream:
/// `allkeys-lru`, `allkeys-lfu`, `allkeys-random` (the `volatile-*` policies evict only keys with
/// a TTL, and `noeviction` refuses writes instead).
pub(super) fn evicts_streams(policy: &str) -> bool {
    policy.starts_with("allkeys-")
}

/// `WAIT replicas timeout` on `c`: Ok once at least `replicas` replicas acknowledged every
/// write made on this connection so far; Err says how many did.
pub(super) fn wait(c: &mut Connection, replicas: u32, timeout: Duration) -> Result<(), String> {
    let acknowledged: u32 = redis::cmd("WAIT")
        .arg(replicas)
        .arg(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX))
        .query(c)
        .map_err(|e| format!("WAIT: {e}"))?;
    if acknowledged >= replicas {
        Ok(())
    } else {
        Err(format!(
            "WAIT: {acknowledged} of {replicas} replicas acknowledged the batch within {} ms; it will be sent again",
            timeout.as_millis()
        ))
    }
}

/// Whether an entry's outcome says the server is not (or no longer) a primary that takes
/// writes: `READONLY` (a replica), `MASTERDOWN` (a replica that lost its primary).
pub(super) fn says_not_primary(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::Deferred(m) if m.starts_with("READONLY") || m.starts_with("MASTERDOWN"))
}

/// Whether trimming removed entries of `stream` that one of its consumer groups had not read:
/// that group's name. From `XINFO STREAM` (`entries-added` − `length`: entries removed, by
/// `MAXLEN` or `XDEL`; `recorded-first-entry-id`) and `XINFO GROUPS` (`entries-read`, or when
/// that is unknown, `last-delivered-id` before the first entry left). None when none did, or the
/// server can't say (before Redis 7.0, no such stream); Err when the server does not answer.
pub(super) fn trimmed_unread(
    c: &mut Connection,
    stream: &str,
) -> Result<Option<String>, RedisError> {
    let info: HashMap<String, redis::Value> =
        match redis::cmd("XINFO").arg("STREAM").arg(stream).query(c) {
            Ok(info) => info,
            Err(e) if e.is_io_error() || e.is_timeout() => return Err(e),
            // No such stream (any more), or XINFO refused: nothing to say of it.
            Err(_) => return Ok(None),
        };
    let int = |v: Option<&redis::Value>| match v {
        Some(redis::Value::Int(n)) => Some(*n),
        _ => None,
    };
    let id = |v: Option<&redis::Value>| {
        let text = redis::from_redis_value_ref::<String>(v?).ok()?;
        let (ms, seq) = text.split_once('-')?;
        Some((ms.parse::<u64>().ok()?, seq.parse::<u64>().ok()?))
    };
    let Some(removed) = int(info.get("entries-added"))
        .zip(int(info.get("length")))
        .map(|(a, l)| a - l)
    else {
        return Ok(None);
    };
    if removed <= 0 {
        return Ok(None);
    }
    let first = id(info.get("recorded-first-entry-id"));
    let groups: Vec<HashMap<String, redis::Value>> =
        match redis::cmd("XINFO").arg("GROUPS").arg(stream).query(c) {
            Ok(groups) => groups,
            Err(e) if e.is_io_error() || e.is_timeout() => return Err(e),
            Err(_) => return Ok(None),
        };
    Ok(groups.iter().find_map(|g| {
        let name = redis::from_redis_value_ref::<String>(g.get("name")?).ok()?;
        let lost = match int(g.get("entries-read")) {
            Some(read) => read < removed,
            // Never read, or read past deletions: the last entry it was given is older than
            // the oldest one left (an empty stream left nothing to compare with).
            None => id(g.get("last-delivered-id"))? < first?,
        };
        lost.then_some(name)
    }))
}

/// `(major, minor)` from the `redis_version:` line of `INFO server`.
pub(super) fn server_version(info: &str) -> Option<(u32, u32)> {
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

/// Any error talking to the server, outside an entry's reply: the batch's outcome is unknown,
/// so it is retried whole. What an outage is ([`OUTAGE_CODES`]) matters only per entry.
pub(super) fn classify(e: RedisError) -> BatchError {
    BatchError::Unavailable(e.to_string())
}
