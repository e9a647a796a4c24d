//! The claim: finding the committed rows whose turn has come, in publish order, for one backend,
//! and reading them as events. Its statements are planned once per relay process.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use pgrx::prelude::*;
use pgrx::spi::OwnedPreparedStatement;
use pgrx::PgOid;

use crate::event::OutboxEvent;
use crate::pg;
use crate::{api, guc};

/// Which events a relay claims: its backend's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Events whose `backend` column is NULL.
    Default,
    /// Events naming this server.
    Named(String),
    /// Every event: the outbox is still 0.1.0's, without a `backend` column (until `ALTER
    /// EXTENSION broadcaster UPDATE`), so every event is the default backend's.
    Unscoped,
}

impl Scope {
    /// The condition that `alias`'s row is this scope's, with the server's name in `$param`
    /// (a parameter the statement always declares, unused for the default).
    fn mine(&self, alias: &str, param: usize) -> String {
        match self {
            Scope::Default => format!("{alias}.backend IS NULL"),
            Scope::Named(_) => format!("{alias}.backend = ${param}"),
            Scope::Unscoped => "true".into(),
        }
    }

    /// The server's name as the statements' parameter.
    fn name(&self) -> Option<String> {
        match self {
            Scope::Default | Scope::Unscoped => None,
            Scope::Named(name) => Some(name.clone()),
        }
    }
}

/// Committed rows of the scope whose turn has come, oldest first (by tuple id, for
/// [`claim_sql`]): all of them while `broadcaster_failures` holds none of the scope's, its
/// first arm evaluated once per query (an InitPlan). Otherwise a row waits while it has failed
/// and its retry is not due, or is dead; and while an earlier row of its partition key and
/// backend has failed and is not dead (or is dead, when `$2`: broadcaster.on_dead_event =
/// hold), so a key's events never overtake each other. A failure whose row is gone (deleted by
/// hand) holds nothing, nor one whose row's key changed since (its next failed attempt records
/// the new key). `$3`: the server.
pub(super) fn ready(scope: &Scope) -> String {
    format!(
        r#"
SELECT o.ctid
  FROM @extschema@.broadcaster_outbox o
 WHERE {o}
   AND (NOT (SELECT EXISTS (SELECT 1 FROM @extschema@.broadcaster_failures f0 WHERE {f0}))
    OR (NOT EXISTS (SELECT 1 FROM @extschema@.broadcaster_failures f
                     WHERE f.seq = o.seq AND (f.dead OR f.next_attempt_at > now()))
        AND NOT EXISTS (SELECT 1 FROM @extschema@.broadcaster_failures b
                          JOIN @extschema@.broadcaster_outbox h ON h.seq = b.seq
                         WHERE b.partition_key = o.partition_key AND b.seq < o.seq
                           AND h.partition_key = o.partition_key AND {h}
                           AND (NOT b.dead OR $2))))
 ORDER BY o.seq LIMIT $1"#,
        o = scope.mine("o", 3),
        f0 = scope.mine("f0", 3),
        h = scope.mine("h", 3),
    )
}

/// What the claim returns of each row of `rel`, [`CLAIM_COLUMNS`] columns. `id`, `time` and
/// `data` as they are stored (uuid, timestamptz, json: text inside), read without output
/// functions; the attempts so far looked up only when `checked` and some event has failed.
fn claimed(rel: &str, checked: bool) -> String {
    let attempts = if checked {
        format!(
            "CASE WHEN (SELECT EXISTS (SELECT 1 FROM @extschema@.broadcaster_failures))
            THEN coalesce((SELECT f.attempts FROM @extschema@.broadcaster_failures f
                            WHERE f.seq = {rel}.seq), 0)
            ELSE 0 END"
        )
    } else {
        "0".to_string()
    };
    format!(
        r#"{rel}.seq, id, type, source, subject, "time", datacontenttype, dataschema, data,
       partition_key, extensions::text, stream, {attempts}"#
    )
}

/// Every committed row of the scope, oldest first: what [`ready`] finds while
/// `broadcaster_failures` holds none of the scope's, without its checks. Their cost is paid by
/// each claim, a commit's single event too. `$2`: the server.
fn all(scope: &Scope) -> String {
    format!(
        "SELECT o.ctid FROM @extschema@.broadcaster_outbox o WHERE {} ORDER BY o.seq LIMIT $1",
        scope.mine("o", 2)
    )
}

/// The same, passing over rows `$2` to `$3` without reading them: the relay deleted them
/// earlier in its transaction (see [`Deleted`]), and an index scan would fetch each of them to
/// find it gone, at every claim after the first. `$4`: the server.
pub(super) fn all_past(scope: &Scope) -> String {
    let o = scope.mine("o", 4);
    format!(
        "
SELECT ctid FROM (
    (SELECT o.ctid, o.seq FROM @extschema@.broadcaster_outbox o WHERE o.seq < $2 AND {o} ORDER BY o.seq LIMIT $1)
    UNION ALL
    (SELECT o.ctid, o.seq FROM @extschema@.broadcaster_outbox o WHERE o.seq > $3 AND {o} ORDER BY o.seq LIMIT $1)
) r ORDER BY seq LIMIT $1"
    )
}

/// Whether `broadcaster_failures` holds a failure of the scope's; `$1`: the server.
fn any_failure(scope: &Scope) -> String {
    format!(
        "SELECT EXISTS (SELECT 1 FROM @extschema@.broadcaster_failures f WHERE {})",
        scope.mine("f", 1)
    )
}

/// False once the relay has seen no failure of its scope, until it records one: only the
/// scope's relay writes its failures (others only delete them), so until then it claims with
/// [`all`] (and [`all_past`]) rather than [`ready`]. True at start.
static FAILURES_POSSIBLE: AtomicBool = AtomicBool::new(true);

/// The relay recorded a failure: the claim checks them again.
pub fn failure_recorded() {
    FAILURES_POSSIBLE.store(true, Ordering::Relaxed);
}

/// Whether the scope's failures may exist (the housekeeping forgets orphans only then).
pub fn failures_maybe() -> bool {
    FAILURES_POSSIBLE.load(Ordering::Relaxed)
}

/// How a claim finds its rows; the relay keeps a prepared claim for each.
#[derive(Clone, Copy, PartialEq)]
enum Find {
    /// [`all`]: while no failure of the scope is known.
    All = 0,
    /// [`ready`]: while failures may exist.
    Ready = 1,
    /// [`all_past`]: the next claims of a transaction, while no failures exist.
    AllPast = 2,
}

impl Find {
    const EACH: [Find; 3] = [Find::All, Find::Ready, Find::AllPast];

    fn rows(self, scope: &Scope) -> String {
        match self {
            Find::All => all(scope),
            Find::Ready => ready(scope),
            Find::AllPast => all_past(scope),
        }
    }

    /// The parameters' types; the last is always the server's name.
    fn arg_types(self) -> Vec<PgOid> {
        use pg_sys::BuiltinOid::{BOOLOID, INT8OID, TEXTOID};
        let types: &[pg_sys::BuiltinOid] = match self {
            Find::All => &[INT8OID, TEXTOID],
            Find::Ready => &[INT8OID, BOOLOID, TEXTOID],
            Find::AllPast => &[INT8OID, INT8OID, INT8OID, TEXTOID],
        };
        types.iter().map(|&t| PgOid::BuiltIn(t)).collect()
    }
}

/// Claims the ready rows by deleting them, in one statement: the relay's subtransaction undoes
/// the delete unless every event went out (see `relay_batch`). Meanwhile the rows are locked
/// by the delete: a second relay waits for them and then finds them gone, so no row goes out
/// twice. Rows come back in tuple order; the relay puts them in `seq` order.
fn claim_sql(find: Find, scope: &Scope) -> String {
    format!(
        "DELETE FROM @extschema@.broadcaster_outbox o WHERE ctid = ANY (ARRAY({})) RETURNING {}",
        find.rows(scope),
        claimed("o", find == Find::Ready)
    )
}

/// With `broadcaster.retention` set: the same, keeping a copy for replay.
fn claim_and_keep_sql(find: Find, scope: &Scope) -> String {
    let columns = super::batch::published_columns(*scope != Scope::Unscoped);
    format!(
        "WITH claimed AS (
    DELETE FROM @extschema@.broadcaster_outbox WHERE ctid = ANY (ARRAY({})) RETURNING *),
kept AS (
    INSERT INTO @extschema@.broadcaster_published ({columns})
    SELECT {columns} FROM claimed)
SELECT {} FROM claimed",
        find.rows(scope),
        claimed("claimed", find == Find::Ready)
    )
}

/// Whether the outbox of `schema` has the `backend` column (0.2.0 and later).
fn outbox_has_backend(schema: &str) -> bool {
    Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute \
          WHERE attrelid = pg_catalog.to_regclass($1) AND attname = 'backend' AND NOT attisdropped)",
        &[format!("{schema}.broadcaster_outbox").into()],
    )
    .ok()
    .flatten()
    .unwrap_or(false)
}

/// Whether a relay of [`Scope::Unscoped`] should prepare its statements again: the update
/// that adds `backend` has run.
pub fn outbox_got_backend(statements: &Statements) -> bool {
    statements.scope == Scope::Unscoped && outbox_has_backend(&statements.schema)
}

/// The ready rows, read and locked but not deleted: the claim of a relay whose backend writes
/// in the relay's own transaction (`function`), which then deletes what was delivered.
fn peek_sql(scope: &Scope) -> String {
    format!(
        "SELECT {} FROM @extschema@.broadcaster_outbox o WHERE o.ctid = ANY (ARRAY({})) FOR UPDATE OF o",
        claimed("o", true),
        ready(scope)
    )
}

/// The relay's statements, planned once per worker process.
pub struct Statements {
    pub scope: Scope,
    /// The extension's schema, quoted as an identifier.
    pub schema: String,
    /// broadcaster_outbox, for VACUUM.
    pub outbox: pg_sys::Oid,
    /// One per [`Find`], indexed by it.
    claim: Vec<OwnedPreparedStatement>,
    claim_and_keep: Vec<OwnedPreparedStatement>,
    peek: OwnedPreparedStatement,
    any_failure: OwnedPreparedStatement,
    pub retire: OwnedPreparedStatement,
    pub retire_and_keep: OwnedPreparedStatement,
    pub purge: OwnedPreparedStatement,
    pub fail: OwnedPreparedStatement,
    pub clear: OwnedPreparedStatement,
    pub forget: OwnedPreparedStatement,
}

/// `sql` with `@extschema@` replaced by `schema` (an identifier, quoted), as in an extension's
/// script.
pub fn in_schema(sql: &str, schema: &str) -> String {
    sql.replace("@extschema@", schema)
}

/// Finds the extension's schema, readies the session and prepares the relay's statements for
/// `scope`; None while the extension is not installed.
pub fn prepare_session(scope: Scope) -> Option<Statements> {
    // Nothing the relay runs resolves a name through a schema: the extension's may be writable
    // by other roles (public, often), and the relay runs as a superuser. So the path holds
    // pg_catalog only, and the statements name the extension's schema ([`in_schema`]). And a
    // lost commit of this session only un-deletes rows Redis already has, which are then sent
    // again with the same ids: at-least-once holds without waiting for the WAL flush of each
    // batch. And the claim stays on an index whatever the statistics say: planned while the
    // outbox is empty, it would otherwise become a sort of the whole table, kept for a backlog.
    // Its plan does not depend on the parameters' values: planned once, not at each claim, and
    // never compiled (a generic plan's estimates for a backlog would have JIT compile it at
    // each run: milliseconds per claim).
    Spi::run(
        "SELECT pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', false), \
                pg_catalog.set_config('synchronous_commit', 'off', false), \
                pg_catalog.set_config('enable_seqscan', 'off', false), \
                pg_catalog.set_config('plan_cache_mode', 'force_generic_plan', false), \
                pg_catalog.set_config('jit', 'off', false)",
    )
    .ok()?;
    let schema = Spi::get_one::<String>(
        "SELECT pg_catalog.quote_ident(n.nspname) FROM pg_catalog.pg_extension e \
           JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace \
          WHERE e.extname = 'broadcaster'",
    )
    .ok()
    .flatten()?;
    let outbox = Spi::get_one_with_args::<pg_sys::Oid>(
        "SELECT pg_catalog.to_regclass($1)::pg_catalog.oid",
        &[format!("{schema}.broadcaster_outbox").into()],
    )
    .ok()
    .flatten()?;
    let oid = |o: pg_sys::BuiltinOid| PgOid::BuiltIn(o);
    use pg_sys::BuiltinOid::{BOOLOID, FLOAT8OID, INT4OID, INT8ARRAYOID, INT8OID, TEXTOID};
    let sequence = Spi::get_one_with_args::<String>(
        "SELECT pg_catalog.pg_get_serial_sequence($1, 'seq')",
        &[format!("{schema}.broadcaster_outbox").into()],
    )
    .ok()
    .flatten()?;
    let scope = if scope == Scope::Default && !outbox_has_backend(&schema) {
        Scope::Unscoped
    } else {
        scope
    };
    let q = |sql: &str| in_schema(sql, &schema).replace("@outbox_seq@", &sequence);
    let with_backend = scope != Scope::Unscoped;
    let prepared = Spi::connect(|client| {
        // One statement per way of finding rows, in `Find` order.
        let each_find = |sql: fn(Find, &Scope) -> String| {
            Find::EACH
                .iter()
                .map(|&find| {
                    Ok(client
                        .prepare_mut(&q(&sql(find, &scope)), &find.arg_types())?
                        .keep())
                })
                .collect::<Result<Vec<_>, pgrx::spi::Error>>()
        };
        Ok::<_, pgrx::spi::Error>(Statements {
            schema: schema.clone(),
            outbox,
            claim: each_find(claim_sql)?,
            claim_and_keep: each_find(claim_and_keep_sql)?,
            peek: client
                .prepare_mut(
                    &q(&peek_sql(&scope)),
                    &[oid(INT8OID), oid(BOOLOID), oid(TEXTOID)],
                )?
                .keep(),
            any_failure: client
                .prepare_mut(&q(&any_failure(&scope)), &[oid(TEXTOID)])?
                .keep(),
            retire: client
                .prepare_mut(&q(super::batch::RETIRE), &[oid(INT8ARRAYOID)])?
                .keep(),
            retire_and_keep: client
                .prepare_mut(
                    &q(&super::batch::retire_and_keep_sql(with_backend)),
                    &[oid(INT8ARRAYOID)],
                )?
                .keep(),
            purge: client
                .prepare_mut(
                    &q(super::housekeeping::PURGE),
                    &[oid(FLOAT8OID), oid(INT8OID)],
                )?
                .keep(),
            fail: client
                .prepare_mut(
                    &q(&super::batch::fail_sql(with_backend)),
                    &[oid(INT8OID), oid(TEXTOID), oid(FLOAT8OID), oid(INT4OID)],
                )?
                .keep(),
            clear: client
                .prepare_mut(&q(super::batch::CLEAR), &[oid(INT8ARRAYOID)])?
                .keep(),
            forget: client
                .prepare_mut(&q(super::housekeeping::FORGET), &[])?
                .keep(),
            scope: scope.clone(),
        })
    });
    match prepared {
        Ok(statements) => Some(statements),
        Err(e) => {
            // The extension is there but its tables are not what this library expects (an
            // ALTER EXTENSION ... UPDATE not run yet): say so rather than leave silently.
            warning!("broadcaster: preparing the relay's statements failed: {e}; is ALTER EXTENSION broadcaster UPDATE needed?");
            None
        }
    }
}

/// Whether the claim must check `broadcaster_failures` ([`FAILURES_POSSIBLE`]): asks the table
/// only while it may hold something of the scope's.
pub fn failures_possible(statements: &Statements) -> bool {
    if !FAILURES_POSSIBLE.load(Ordering::Relaxed) {
        return false;
    }
    let any = Spi::connect(|client| {
        client
            .select(
                &statements.any_failure,
                None,
                &[statements.scope.name().into()],
            )?
            .first()
            .get_one::<bool>()
    });
    // Unknown counts as possible: checking costs time, not correctness.
    let possible = !matches!(any, Ok(Some(false)));
    FAILURES_POSSIBLE.store(possible, Ordering::Relaxed);
    possible
}

/// Claimed rows, in `seq` order: the events they carry (or why a row does not read as one).
#[derive(Default)]
pub struct Claimed {
    pub seqs: Vec<i64>,
    pub attempts: Vec<i32>,
    /// The rows that read as events, in order, and their places in the batch.
    pub events: Arc<Vec<OutboxEvent>>,
    pub sent: Vec<usize>,
    /// The rows that don't: place, and why.
    pub unreadable: Vec<(usize, String)>,
}

/// A run of `seq`s, `lo` to `hi`, every one of which the relay has deleted in its current
/// transaction, so none can be ready: its next claim passes over them without reading their
/// rows. Only the relay's own deletes: a row below `lo` that was not visible to one claim (its
/// transaction still running) may be to the next, and is found there in its place.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Deleted {
    pub lo: i64,
    pub hi: i64,
}

impl Deleted {
    /// No row: below `i64::MAX` and above the one below it is everything.
    pub const NONE: Deleted = Deleted {
        lo: i64::MAX,
        hi: i64::MAX - 1,
    };

    pub fn len(self) -> i64 {
        self.hi.saturating_sub(self.lo).saturating_add(1).max(0)
    }

    /// The run after a claim also deleted `seqs` (ascending): this one grown by those that
    /// follow on from its end, or the longest run in `seqs` when that is longer.
    pub fn after(self, seqs: &[i64]) -> Deleted {
        let mut grown = self;
        if self.len() > 0 {
            let next = |hi: i64| hi.checked_add(1);
            let start = seqs.partition_point(|&s| Some(s) < next(self.hi));
            for &seq in &seqs[start..] {
                if Some(seq) != next(grown.hi) {
                    break;
                }
                grown.hi = seq;
            }
        }
        let mut longest = Deleted::NONE;
        let mut run_start = 0;
        for i in 0..seqs.len() {
            if i > 0 && seqs[i - 1].checked_add(1) != Some(seqs[i]) {
                run_start = i;
            }
            let run = Deleted {
                lo: seqs[run_start],
                hi: seqs[i],
            };
            if run.len() > longest.len() {
                longest = run;
            }
        }
        if longest.len() > grown.len() {
            longest
        } else {
            grown
        }
    }
}

/// Columns of [`claimed`].
const CLAIM_COLUMNS: usize = 13;

/// Claims up to `limit` ready rows (see [`claim_sql`]), checking `broadcaster_failures` when
/// `checked`, otherwise passing over the rows `deleted` earlier in this transaction.
pub fn claim(statements: &Statements, limit: usize, checked: bool, deleted: Deleted) -> Claimed {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let find = if checked {
        Find::Ready
    } else if deleted.len() > 0 {
        Find::AllPast
    } else {
        Find::All
    };
    let statement = if guc::retention().is_zero() {
        &statements.claim[find as usize]
    } else {
        &statements.claim_and_keep[find as usize]
    };
    let server = statements.scope.name();
    let args = match find {
        Find::All => vec![limit.into(), server.into()],
        Find::Ready => vec![
            limit.into(),
            guc::dead_event_holds_key().into(),
            server.into(),
        ],
        Find::AllPast => vec![
            limit.into(),
            deleted.lo.into(),
            deleted.hi.into(),
            server.into(),
        ],
    };
    read_claimed(|client| client.update(statement, None, &args).map(drop))
}

/// The ready rows of the scope, up to `limit`, locked but not deleted (see [`peek_sql`]).
pub fn peek(statements: &Statements, limit: usize) -> Claimed {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let args = vec![
        limit.into(),
        guc::dead_event_holds_key().into(),
        statements.scope.name().into(),
    ];
    read_claimed(|client| client.update(&statements.peek, None, &args).map(drop))
}

/// Runs `query` (a claim) and reads the rows it returns as events.
fn read_claimed(
    query: impl FnOnce(&mut pgrx::spi::SpiClient<'_>) -> Result<(), pgrx::spi::Error>,
) -> Claimed {
    use pg_sys::{InvalidOid, JSONOID, TIMESTAMPTZOID, UUIDOID};
    const TYPES: [pg_sys::Oid; CLAIM_COLUMNS] = [
        InvalidOid,
        UUIDOID,
        InvalidOid,
        InvalidOid,
        InvalidOid,
        TIMESTAMPTZOID,
        InvalidOid,
        InvalidOid,
        JSONOID,
        InvalidOid,
        InvalidOid,
        InvalidOid,
        InvalidOid,
    ];
    Spi::connect_mut(|client| {
        query(client)?;
        let mut rows = Vec::new();
        let read = pg::read_spi_rows(&TYPES, |row| {
            // The key goes with the error: the key's later rows must wait behind this one.
            let extensions = match row.text(10) {
                Some(json) if json != "{}" => serde_json::from_str(&json)
                    .map_err(|_| ("extensions must be a JSON object".to_string(), row.text(9))),
                _ => Ok(Default::default()),
            };
            let event = extensions.map(|extensions| OutboxEvent {
                id: row.uuid(1).map(|b| uuid_text(&b)).unwrap_or_default(),
                ty: row.text(2).unwrap_or_default(),
                source: row.text(3).unwrap_or_default(),
                subject: row.text(4),
                time: if row.is_null(5) {
                    String::new()
                } else {
                    rfc3339(row.int(5))
                },
                datacontenttype: row.text(6).unwrap_or_default(),
                dataschema: row.text(7),
                data: row.text(8),
                partition_key: row.text(9),
                extensions,
                stream: row.text(11),
            });
            rows.push((row.int(0), row.int(12) as i32, event));
        });
        if read.is_none() {
            return Err(pgrx::spi::SpiErrorCodes::NoAttribute.into());
        }
        if !rows.is_sorted_by_key(|r| r.0) {
            rows.sort_unstable_by_key(|r| r.0);
        }
        let n = rows.len();
        let mut claimed = Claimed {
            seqs: Vec::with_capacity(n),
            attempts: Vec::with_capacity(n),
            sent: Vec::with_capacity(n),
            ..Default::default()
        };
        let mut events = Vec::with_capacity(n);
        // Keys of rows that don't read as events.
        let mut held: HashSet<String> = HashSet::new();
        for (i, (seq, attempts, event)) in rows.into_iter().enumerate() {
            claimed.seqs.push(seq);
            claimed.attempts.push(attempts);
            match event {
                // Behind an unreadable row of its key: left pending, neither sent nor failed.
                Ok(event)
                    if !held.is_empty()
                        && event
                            .partition_key
                            .as_ref()
                            .is_some_and(|k| held.contains(k)) => {}
                Ok(event) => {
                    claimed.sent.push(i);
                    events.push(event);
                }
                Err((e, key)) => {
                    held.extend(key);
                    claimed.unreadable.push((i, e));
                }
            }
        }
        claimed.events = Arc::new(events);
        Ok::<_, pgrx::spi::Error>(claimed)
    })
    .unwrap_or_else(|e| {
        // SPI-level failures are not expected: end this relay (the launcher starts another)
        // rather than retry in a loop.
        error!("broadcaster: claiming events failed: {e}")
    })
}

/// A timestamptz (microseconds since 2000-01-01 00:00 UTC) as RFC 3339, in UTC with
/// microseconds: `2026-11-27T07:00:00.123456Z`. The outbox's trigger keeps `time` within years
/// 1 to 9999.
pub fn rfc3339(timestamp: i64) -> String {
    const UNIX_DAYS_AT_2000: i64 = 10_957;
    // Outside them only in a row written while the trigger was disabled: then not a time the
    // event can carry, and refused as such when the event is built.
    if !(api::TIME_MIN..api::TIME_END).contains(&timestamp) {
        return format!("{timestamp} microseconds from 2000-01-01");
    }
    let micros = timestamp.rem_euclid(1_000_000);
    let seconds = timestamp.div_euclid(1_000_000);
    let (days, second) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    // Days since 1970-01-01 to a civil date (H. Hinnant, "chrono-Compatible Low-Level Date
    // Algorithms").
    let z = days + UNIX_DAYS_AT_2000 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    // Written digit by digit: `format!` took about 6% of the relay's time at full speed.
    let mut text = *b"0000-00-00T00:00:00.000000Z";
    let mut put = |at: usize, width: usize, mut value: i64| {
        for i in (at..at + width).rev() {
            text[i] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, second / 3_600);
    put(14, 2, second / 60 % 60);
    put(17, 2, second % 60);
    put(20, 6, micros);
    text.iter().map(|&b| char::from(b)).collect()
}

/// A uuid in its canonical text form.
pub fn uuid_text(bytes: &[u8; 16]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(36);
    for (i, b) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            text.push('-');
        }
        text.push(char::from(HEX[usize::from(b >> 4)]));
        text.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    text
}
