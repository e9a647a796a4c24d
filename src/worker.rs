//! The relay worker: a background worker that claims committed outbox rows in publish order by
//! deleting them, hands them to the configured backend in batches, and keeps the deletes of
//! what was delivered, up to a few batches per transaction. Woken by committing producers; a
//! slow poll is only a safety net.

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, BgWorkerStartTime,
    DynamicBackgroundWorker, SignalWakeFlags,
};
use pgrx::pg_sys::AsPgCStr;
use pgrx::prelude::*;
use pgrx::spi::OwnedPreparedStatement;
use pgrx::{PgMemoryContexts, PgOid};

use crate::backend::{self, BackendError, BatchOutcome, Prepared, PublisherBackend};
use crate::event::OutboxEvent;
use crate::{api, guc, shared};

/// How soon a worker that exited with an error is started again.
const RESTART_DELAY: Duration = Duration::from_secs(5);
/// How often the launcher looks for the database and at the relay.
const LAUNCHER_CHECK: Duration = Duration::from_secs(1);
/// First retry delay after a broker outage; doubles up to `broadcaster.retry_max_delay`.
const RETRY_BASE_DELAY: Duration = Duration::from_millis(100);
/// Least time from one small batch to the next. Under a stream of small transactions the relay
/// then takes their events a few at a time, not one claim, round trip and commit per producer
/// commit, which would take a core from the producers. Events committed further apart than
/// this go out at once.
const COALESCE: Duration = Duration::from_millis(1);
/// At most one log line per this interval for a repeating failure.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// At most one log line per this interval while the database is read-only.
const READ_ONLY_LOG_EVERY: Duration = Duration::from_secs(60);
/// Why a read-only database's events wait: `broadcaster_status.last_error` and the log.
const READ_ONLY: &str =
    "the database is read-only (default_transaction_read_only is on); events wait until it is writable";

/// Committed rows whose turn has come, oldest first (by tuple id, for [`claim_sql`]): all of
/// them while `broadcaster_failures` is empty, its first arm evaluated once per query (an
/// InitPlan). Otherwise a row waits while it has failed and its retry is not due, or is dead;
/// and while an earlier row of its partition key has failed and is not dead (or is dead, when
/// `$2`: broadcaster.on_dead_event = hold), so a key's events never overtake each other. A
/// failure whose row is gone (deleted by hand) holds nothing, nor one whose row's key changed
/// since (its next failed attempt records the new key).
const READY: &str = r#"
SELECT o.ctid
  FROM @extschema@.broadcaster_outbox o
 WHERE NOT (SELECT EXISTS (SELECT 1 FROM @extschema@.broadcaster_failures))
    OR (NOT EXISTS (SELECT 1 FROM @extschema@.broadcaster_failures f
                     WHERE f.seq = o.seq AND (f.dead OR f.next_attempt_at > now()))
        AND NOT EXISTS (SELECT 1 FROM @extschema@.broadcaster_failures b
                          JOIN @extschema@.broadcaster_outbox h ON h.seq = b.seq
                         WHERE b.partition_key = o.partition_key AND b.seq < o.seq
                           AND h.partition_key = o.partition_key
                           AND (NOT b.dead OR $2)))
 ORDER BY o.seq LIMIT $1"#;

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

/// Every committed row, oldest first: what [`READY`] finds while `broadcaster_failures` is
/// empty, without its checks. Their cost is paid by each claim, a commit's single event too.
const ALL: &str = "SELECT o.ctid FROM @extschema@.broadcaster_outbox o ORDER BY o.seq LIMIT $1";

/// The same, passing over rows `$2` to `$3` without reading them: the relay deleted them
/// earlier in its transaction (see [`Deleted`]), and an index scan would fetch each of them to
/// find it gone, at every claim after the first.
const ALL_PAST: &str = "
SELECT ctid FROM (
    (SELECT o.ctid, o.seq FROM @extschema@.broadcaster_outbox o WHERE o.seq < $2 ORDER BY o.seq LIMIT $1)
    UNION ALL
    (SELECT o.ctid, o.seq FROM @extschema@.broadcaster_outbox o WHERE o.seq > $3 ORDER BY o.seq LIMIT $1)
) r ORDER BY seq LIMIT $1";

/// Whether `broadcaster_failures` holds anything; see [`FAILURES_POSSIBLE`].
const ANY_FAILURE: &str = "SELECT EXISTS (SELECT 1 FROM @extschema@.broadcaster_failures)";

/// False once the relay has seen `broadcaster_failures` empty, until it records a failure: only
/// the relay writes that table (others only delete from it), so until then it claims with
/// [`ALL`] (and [`ALL_PAST`]) rather than [`READY`]. True at start.
static FAILURES_POSSIBLE: AtomicBool = AtomicBool::new(true);

/// How a claim finds its rows; the relay keeps a prepared claim for each.
#[derive(Clone, Copy, PartialEq)]
enum Find {
    /// [`ALL`]: while `broadcaster_failures` is known to be empty.
    All = 0,
    /// [`READY`]: while failures may exist.
    Ready = 1,
    /// [`ALL_PAST`]: the next claims of a transaction, while no failures exist.
    AllPast = 2,
}

impl Find {
    const EACH: [Find; 3] = [Find::All, Find::Ready, Find::AllPast];

    fn rows(self) -> &'static str {
        match self {
            Find::All => ALL,
            Find::Ready => READY,
            Find::AllPast => ALL_PAST,
        }
    }

    fn arg_types(self) -> Vec<PgOid> {
        use pg_sys::BuiltinOid::{BOOLOID, INT8OID};
        let types: &[pg_sys::BuiltinOid] = match self {
            Find::All => &[INT8OID],
            Find::Ready => &[INT8OID, BOOLOID],
            Find::AllPast => &[INT8OID, INT8OID, INT8OID],
        };
        types.iter().map(|&t| PgOid::BuiltIn(t)).collect()
    }
}

/// Claims the ready rows by deleting them, in one statement: the relay's subtransaction undoes
/// the delete unless every event went out (see [`relay_batch`]). Meanwhile the rows are locked
/// by the delete: a second relay waits for them and then finds them gone, so no row goes out
/// twice. Rows come back in tuple order; the relay puts them in `seq` order.
fn claim_sql(find: Find) -> String {
    format!(
        "DELETE FROM @extschema@.broadcaster_outbox o WHERE ctid = ANY (ARRAY({})) RETURNING {}",
        find.rows(),
        claimed("o", find == Find::Ready)
    )
}

/// With `broadcaster.retention` set: the same, keeping a copy for replay.
fn claim_and_keep_sql(find: Find) -> String {
    format!(
        "WITH claimed AS (
    DELETE FROM @extschema@.broadcaster_outbox WHERE ctid = ANY (ARRAY({}))
    RETURNING seq, id, type, source, subject, time, datacontenttype, dataschema, data,
              partition_key, extensions, stream),
kept AS (
    INSERT INTO @extschema@.broadcaster_published
           (seq, id, type, source, subject, time, datacontenttype, dataschema, data,
            partition_key, extensions, stream)
    SELECT seq, id, type, source, subject, time, datacontenttype, dataschema, data,
           partition_key, extensions, stream
      FROM claimed)
SELECT {} FROM claimed",
        find.rows(),
        claimed("claimed", find == Find::Ready)
    )
}

/// Deletes published rows after a batch that did not go out whole (by `seq`: the claim's delete
/// was undone).
const RETIRE: &str = "DELETE FROM @extschema@.broadcaster_outbox WHERE seq = ANY ($1)";

/// With `broadcaster.retention` set: the same, keeping a copy for replay.
const RETIRE_AND_KEEP: &str = "
WITH published AS (
    DELETE FROM @extschema@.broadcaster_outbox WHERE seq = ANY ($1)
    RETURNING seq, id, type, source, subject, time, datacontenttype, dataschema, data,
              partition_key, extensions, stream)
INSERT INTO @extschema@.broadcaster_published
       (seq, id, type, source, subject, time, datacontenttype, dataschema, data,
        partition_key, extensions, stream)
SELECT * FROM published";

/// Drops up to $2 published events older than the retention: small batches, never one huge
/// DELETE.
const PURGE: &str = "
DELETE FROM @extschema@.broadcaster_published
 WHERE ctid = ANY (ARRAY(SELECT ctid FROM @extschema@.broadcaster_published
                          WHERE published_at < now() - make_interval(secs => $1)
                          LIMIT $2))";

/// Deleted outbox rows after which the relay vacuums the outbox itself, once it has caught up.
/// The claim walks the primary key in `seq` order, over every index entry of a deleted row
/// until a VACUUM removes it: 150,000 of them turn a 0.1 ms claim into 1 ms, and autovacuum
/// comes at most once a minute (`autovacuum_naptime`), when 10,000 events a second leave
/// 600,000. A VACUUM of the small table a caught-up relay leaves takes a few milliseconds.
const VACUUM_WHEN_CAUGHT_UP: u64 = 1_000;
/// The same while draining a backlog, where each VACUUM also scans the backlog's index.
const VACUUM_DURING_BACKLOG: u64 = 100_000;
/// Least time between two of the relay's VACUUMs: at 10,000 events a second, one every 1,000
/// rows would stall a batch every 0.1 s.
const VACUUM_EVERY: Duration = Duration::from_secs(1);

/// How often the relay forgets failures whose row is gone ([`FORGET`]).
const FORGET_EVERY: Duration = Duration::from_secs(1);

/// Most rows one purge statement deletes.
const PURGE_BATCH: i64 = 1000;
/// How often an idle relay purges.
const PURGE_EVERY: Duration = Duration::from_secs(1);

/// Counts a failed attempt against the event `$1` (error `$2`), to be retried in `$3` seconds
/// or dead at `$4` attempts. Nothing when its row is gone.
const FAIL: &str = "
INSERT INTO @extschema@.broadcaster_failures AS f
       (seq, partition_key, attempts, next_attempt_at, dead, last_error)
SELECT o.seq, o.partition_key, 1, now() + make_interval(secs => $3), 1 >= $4, $2
  FROM @extschema@.broadcaster_outbox o
 WHERE o.seq = $1
    ON CONFLICT (seq) DO UPDATE
   SET partition_key = EXCLUDED.partition_key,
       attempts = f.attempts + 1,
       next_attempt_at = EXCLUDED.next_attempt_at,
       dead = f.attempts + 1 >= $4,
       last_error = EXCLUDED.last_error";

/// Forgets the failures of events delivered at last.
const CLEAR: &str = "DELETE FROM @extschema@.broadcaster_failures WHERE seq = ANY ($1)";

/// Forgets failures whose row is gone (deleted by hand): they hold nothing, but keep the claim
/// on its slower path. Only those of `seq`s the outbox has handed out: a restore (pg_restore)
/// loads `broadcaster_failures` before `broadcaster_outbox`, and in between every failure looks
/// orphaned; its sequence is set after both, until then it is as new (`is_called` false).
/// `@outbox_seq@`: that sequence, by the name PostgreSQL gave it.
const FORGET: &str = "
DELETE FROM @extschema@.broadcaster_failures f
 WHERE NOT EXISTS (SELECT 1 FROM @extschema@.broadcaster_outbox o WHERE o.seq = f.seq)
   AND f.seq <= (SELECT CASE WHEN s.is_called THEN s.last_value ELSE 0 END
                   FROM @outbox_seq@ s)";

/// Registers the launcher: a worker connected to no database that waits for each database of
/// `broadcaster.database` to exist and accept connections, then starts its relay, and starts it
/// again whenever it stops. A missing, closed or invalid database costs one log line, not a
/// crash loop. Restarted by the postmaster after any exit but a shutdown.
pub fn register() {
    BackgroundWorkerBuilder::new("broadcaster launcher")
        .set_type("broadcaster launcher")
        .set_library("broadcaster")
        .set_function("broadcaster_launcher_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(RESTART_DELAY))
        .load();
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn broadcaster_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // No database: the shared catalogs only, which is all it takes to find one by name.
    BackgroundWorker::connect_worker_to_spi(None, None);
    shared::launcher_started();
    let mut relays: Vec<Launched> = Vec::new();
    follow_settings(&mut relays);
    let mut wait = Duration::ZERO;
    while BackgroundWorker::wait_latch(Some(wait)) {
        wait = LAUNCHER_CHECK;
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            follow_settings(&mut relays);
        }
        for launched in &mut relays {
            launched.check();
        }
    }
    shared::launcher_stopped();
    // Terminated (pg_terminate_backend) or the server is stopping. A worker that exits with
    // code 0 is forgotten by the postmaster; with 1 it is started again after its restart time,
    // unless the server is shutting down.
    log!(
        "broadcaster: launcher stopping; unless the server is shutting down, it starts again in {} s",
        RESTART_DELAY.as_secs()
    );
    unsafe { pg_sys::proc_exit(1) };
}

/// Serves the databases `broadcaster.database` lists now: adding one needs only a reload;
/// the relay of a database no longer listed is stopped.
fn follow_settings(relays: &mut Vec<Launched>) {
    let mut listed = guc::databases();
    if listed.is_empty() {
        log!("broadcaster: broadcaster.database is empty; no relay runs");
    }
    if listed.len() > shared::MAX_RELAYS {
        warning!(
            "broadcaster: {} databases listed; only the first {} are served",
            listed.len(),
            shared::MAX_RELAYS
        );
        listed.truncate(shared::MAX_RELAYS);
    }
    relays.retain_mut(|launched| {
        let keep = listed.contains(&launched.name);
        if !keep {
            log!(
                "broadcaster: no longer serving database \"{}\"",
                launched.name
            );
            if let Some((worker, ..)) = launched.relay.take() {
                worker.terminate();
            }
        }
        keep
    });
    for name in listed {
        if !relays.iter().any(|l| l.name == name) {
            relays.push(Launched {
                name,
                relay: None,
                said: None,
                said_no_slot: false,
                probed_at: None,
            });
        }
    }
}

/// How often the launcher looks again at a database whose relay found no extension, in case the
/// `CREATE EXTENSION` that would have told it went unheard (made while no launcher ran): a
/// relay connects, looks, and leaves.
const EXTENSION_RECHECK: Duration = Duration::from_secs(10);

/// One served database, from the launcher's side.
struct Launched {
    name: String,
    /// The relay started last, when, and for which database oid.
    relay: Option<(DynamicBackgroundWorker, Instant, pg_sys::Oid)>,
    /// Why the relay can't run, as last logged: said once, again only once it changed.
    said: Option<Waiting>,
    said_no_slot: bool,
    /// When a relay last started only to find the extension missing.
    probed_at: Option<Instant>,
}

/// Why a database's relay is not started.
#[derive(Clone, Copy, PartialEq)]
enum Waiting {
    NoDatabase,
    NoConnections,
    Invalid,
    NoExtension,
}

impl Launched {
    /// Starts the relay if the database can be served and its relay is not running.
    fn check(&mut self) {
        if let Some((worker, started, oid)) = &self.relay {
            let stopped = matches!(worker.pid(), Err(BackgroundWorkerStatus::Stopped));
            if !stopped {
                return;
            }
            let probe = shared::take_probe(*oid);
            // A relay that stopped soon after its start is not started again at once, unless it
            // only found the extension missing: that wait is `EXTENSION_RECHECK`'s (or none, if
            // a CREATE EXTENSION has committed since).
            if !probe && started.elapsed() < RESTART_DELAY {
                return;
            }
            if probe {
                self.probed_at = Some(Instant::now());
            }
            self.relay = None;
        }
        let name = self.name.clone();
        let database = BackgroundWorker::transaction(|| find_database(&name));
        let oid = match database {
            Database::Missing => return self.say(Waiting::NoDatabase),
            Database::Closed => return self.say(Waiting::NoConnections),
            Database::Invalid => return self.say(Waiting::Invalid),
            Database::Open(oid) => oid,
        };
        // A backend is dropping, renaming or copying it: connecting now would make that fail.
        if shared::is_aside(oid) {
            return;
        }
        // One left from an earlier launcher (restarted after an error) still runs: one relay per
        // database, never two.
        if shared::relay_of(oid).is_some_and(|r| r.pid != 0) {
            return;
        }
        if shared::extension_absent(oid, false) {
            self.say(Waiting::NoExtension);
            let due = self
                .probed_at
                .is_none_or(|t| t.elapsed() >= EXTENSION_RECHECK);
            if !due {
                return;
            }
            shared::extension_absent(oid, true);
        }
        match launch_relay(oid) {
            Ok(worker) => {
                self.relay = Some((worker, Instant::now(), oid));
                self.said_no_slot = false;
                if self.said != Some(Waiting::NoExtension) {
                    self.said = None;
                }
            }
            Err(_) if !self.said_no_slot => {
                warning!(
                    "broadcaster: cannot start the relay for \"{name}\"; raise max_worker_processes"
                );
                self.said_no_slot = true;
            }
            Err(_) => {}
        }
    }

    /// Logs why the relay waits, once for each new reason.
    fn say(&mut self, why: Waiting) {
        if self.said == Some(why) {
            return;
        }
        let name = &self.name;
        match why {
            Waiting::NoDatabase => log!("broadcaster: waiting for database \"{name}\" to exist"),
            Waiting::NoConnections => log!(
                "broadcaster: database \"{name}\" does not allow connections; waiting until it does"
            ),
            Waiting::Invalid => log!(
                "broadcaster: database \"{name}\" is invalid (an interrupted DROP DATABASE); waiting until it is dropped or re-created"
            ),
            Waiting::NoExtension => log!(
                "broadcaster: waiting for CREATE EXTENSION broadcaster in database \"{name}\""
            ),
        }
        self.said = Some(why);
    }
}

/// What pg_database says of a database the launcher is to serve.
enum Database {
    Missing,
    /// `ALLOW_CONNECTIONS false`: a relay would be refused.
    Closed,
    /// Left half-dropped by an interrupted `DROP DATABASE` (`datconnlimit` = -2).
    Invalid,
    Open(pg_sys::Oid),
}

/// `datconnlimit` of a database an interrupted `DROP DATABASE` left invalid (PostgreSQL
/// 15.4 and later: `DATCONNLIMIT_INVALID_DB`).
const DATCONNLIMIT_INVALID_DB: i32 = -2;

/// Looks `name` up in pg_database with a plain heap scan, as Postgres's autovacuum launcher
/// does: a process connected to no database can read shared catalogs, not their indexes.
fn find_database(name: &str) -> Database {
    let mut found = Database::Missing;
    unsafe {
        let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
        let rel = pg_sys::table_open(pg_sys::DatabaseRelationId, lock);
        let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
        loop {
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                break;
            }
            let form = pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_database>(tuple);
            let datname = std::ffi::CStr::from_ptr((*form).datname.data.as_ptr());
            if datname.to_bytes() == name.as_bytes() {
                found = if (*form).datconnlimit == DATCONNLIMIT_INVALID_DB {
                    Database::Invalid
                } else if !(*form).datallowconn {
                    Database::Closed
                } else {
                    Database::Open((*form).oid)
                };
                break;
            }
        }
        pg_sys::table_endscan(scan);
        pg_sys::table_close(rel, lock);
    }
    found
}

fn launch_relay(
    database: pg_sys::Oid,
) -> Result<DynamicBackgroundWorker, pgrx::bgworkers::DynamicBackgroundWorkerLoadError> {
    // Not restarted by the postmaster: the launcher restarts it while the database exists.
    BackgroundWorkerBuilder::new("broadcaster relay")
        .set_type("broadcaster relay")
        .set_library("broadcaster")
        .set_function("broadcaster_relay_main")
        .set_argument(Some(pg_sys::Datum::from(database.to_u32())))
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(None)
        .load_dynamic()
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn broadcaster_relay_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let oid = pg_sys::Oid::from(u32::try_from(arg.value()).unwrap_or(0));
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(oid), None);
    // A catalog lookup: only inside a transaction.
    let database = BackgroundWorker::transaction(|| unsafe {
        let name = pg_sys::get_database_name(pg_sys::MyDatabaseId);
        if name.is_null() {
            String::new()
        } else {
            std::ffi::CStr::from_ptr(name)
                .to_string_lossy()
                .into_owned()
        }
    });
    // Started for a database by oid, which a RENAME may have given another name since: served
    // only under a name that is listed.
    if !guc::databases().contains(&database) {
        log!("broadcaster: database \"{database}\" is not listed in broadcaster.database; its relay leaves");
        return;
    }
    // Without the extension, the relay leaves at once: waiting connected would hold the
    // database (no CREATE DATABASE ... TEMPLATE of it, no DROP). The launcher starts it again
    // when a CREATE EXTENSION commits there, or after a while.
    let Some(statements) = BackgroundWorker::transaction(prepare_session) else {
        shared::note_extension_absent(unsafe { pg_sys::MyDatabaseId });
        return;
    };
    // However this process ends (an ERROR included), its slot stops claiming a live relay.
    unsafe { pg_sys::before_shmem_exit(Some(on_relay_exit), pg_sys::Datum::from(0usize)) };
    if !shared::relay_started(unsafe { pg_sys::MyDatabaseId }) {
        warning!("broadcaster: no free relay slot; \"{database}\" is relayed without health reports or commit wake-ups");
    }
    log!("broadcaster: relay worker serving database \"{database}\"");

    let mut relay = Relay::new(database, statements);
    relay.run();

    shared::relay_stopped();
    log!("broadcaster: relay worker stopped");
}

#[pg_guard]
unsafe extern "C-unwind" fn on_relay_exit(_code: std::ffi::c_int, _arg: pg_sys::Datum) {
    shared::relay_stopped();
}

/// What one pass of the loop found.
enum Tick {
    /// The outbox had nothing ready.
    Idle,
    /// A batch went out (`retired` rows deleted); there may be more when it was `full`.
    Published { full: bool, retired: usize },
    /// The database is read-only (`default_transaction_read_only`): nothing can be claimed.
    ReadOnly,
    /// The broker is unavailable or the backend misconfigured: back off.
    Outage(BackendError),
}

struct Relay {
    database: String,
    backend: Option<Box<dyn PublisherBackend>>,
    /// The relay's statements, prepared when it started.
    statements: Statements,
    /// When the relay last said its database is read-only; None while it is writable.
    said_read_only: Option<Instant>,
    /// Whether [`check_origin`] has run: once, at the first writable pass.
    origin_checked: bool,
    /// Consecutive outages, for the backoff.
    outages: u32,
    retry_at: Option<Instant>,
    last_contact: Option<Instant>,
    /// When the last batch that emptied the queue started.
    last_small_batch: Option<Instant>,
    last_purge: Option<Instant>,
    last_forget: Option<Instant>,
    /// Outbox rows deleted since the relay's last VACUUM of it, and when that was.
    retired_since_vacuum: u64,
    last_vacuum: Option<Instant>,
    last_log: Option<Instant>,
    suppressed_logs: u32,
    jitter_state: u64,
}

impl Relay {
    fn new(database: String, statements: Statements) -> Self {
        Relay {
            database,
            backend: None,
            statements,
            said_read_only: None,
            origin_checked: false,
            outages: 0,
            retry_at: None,
            last_contact: None,
            last_small_batch: None,
            last_purge: None,
            last_forget: None,
            retired_since_vacuum: 0,
            last_vacuum: None,
            last_log: None,
            suppressed_logs: 0,
            jitter_state: u64::from(unsafe { pg_sys::MyProcPid }.unsigned_abs()) | 1,
        }
    }

    fn run(&mut self) {
        let mut more = false;
        while BackgroundWorker::wait_latch(Some(self.sleep_time(more))) {
            if BackgroundWorker::sighup_received() {
                unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
                // Rebuilt from the new settings on the next pass.
                self.backend = None;
                self.retry_at = None;
            }
            if shared::asked_to_leave() {
                log!(
                    "broadcaster: relay leaves database \"{}\" while a command needs it alone (DROP, RENAME or copy of the database)",
                    self.database
                );
                break;
            }
            if self.retry_at.is_some_and(|t| Instant::now() < t) {
                more = false;
                continue;
            }
            shared::set_backing_off(false);
            if !more {
                self.coalesce();
            }
            let started = Instant::now();
            more = match self.tick() {
                Tick::Published { full, .. } => {
                    self.outages = 0;
                    self.retry_at = None;
                    if !full {
                        self.last_small_batch = Some(started);
                    }
                    full
                }
                Tick::Idle => false,
                Tick::ReadOnly => {
                    self.wait_read_only();
                    false
                }
                Tick::Outage(e) => {
                    self.back_off(&e);
                    false
                }
            };
        }
    }

    /// Woken within [`COALESCE`] of the last small batch: lets a few more commits land first.
    fn coalesce(&self) {
        let Some(remaining) = self
            .last_small_batch
            .and_then(|t| COALESCE.checked_sub(t.elapsed()))
        else {
            return;
        };
        let micros = std::ffi::c_long::try_from(remaining.as_micros()).unwrap_or(0);
        unsafe { pg_sys::pg_usleep(micros) };
    }

    /// Zero when a full batch suggests more rows are waiting; otherwise until the backoff ends
    /// or the safety-net poll, whichever is first. Commits wake the worker earlier.
    fn sleep_time(&self, more: bool) -> Duration {
        if more {
            return Duration::ZERO;
        }
        let poll = guc::poll_interval();
        match self.retry_at {
            Some(t) => t.saturating_duration_since(Instant::now()).min(poll),
            None => poll,
        }
    }

    fn tick(&mut self) -> Tick {
        if unsafe { pg_sys::DefaultXactReadOnly } {
            return Tick::ReadOnly;
        }
        if self.said_read_only.take().is_some() {
            shared::set_read_only(false);
            log!(
                "broadcaster: database \"{}\" is writable again; relaying",
                self.database
            );
        }
        if !self.origin_checked {
            let schema = &self.statements.schema;
            BackgroundWorker::transaction(|| check_origin(&self.database, schema));
            self.origin_checked = true;
        }
        let backend = match self.backend.take() {
            Some(b) => b,
            None => match build_backend(&self.database) {
                Ok(b) => b,
                Err(e) => return Tick::Outage(e),
            },
        };
        let mut backend = backend;
        let statements = &self.statements;
        let tick = BackgroundWorker::transaction(AssertUnwindSafe(|| {
            relay_batch(statements, &mut *backend)
        }));
        self.backend = Some(backend);
        if let Tick::Published { retired, .. } = tick {
            self.retired_since_vacuum += retired as u64;
        }
        let caught_up = !matches!(tick, Tick::Published { full: true, .. });
        let threshold = if caught_up {
            VACUUM_WHEN_CAUGHT_UP
        } else {
            VACUUM_DURING_BACKLOG
        };
        let due = self.last_vacuum.is_none_or(|t| t.elapsed() >= VACUUM_EVERY);
        if self.retired_since_vacuum >= threshold && due && !shared::asked_to_leave() {
            vacuum_outbox(statements.outbox);
            self.retired_since_vacuum = 0;
            self.last_vacuum = Some(Instant::now());
        }
        // Busy or idle: a relay that never idles must still forget them. None to forget while
        // the table is known empty.
        let due = self.last_forget.is_none_or(|t| t.elapsed() >= FORGET_EVERY);
        if due && FAILURES_POSSIBLE.load(Ordering::Relaxed) {
            BackgroundWorker::transaction(|| forget_orphan_failures(statements));
            self.last_forget = Some(Instant::now());
        }
        if matches!(tick, Tick::Idle) {
            if self.last_purge.is_none_or(|t| t.elapsed() >= PURGE_EVERY) {
                BackgroundWorker::transaction(|| purge(statements));
                self.last_purge = Some(Instant::now());
            }
            self.check_health_when_idle()
        } else {
            if matches!(tick, Tick::Published { .. }) {
                self.last_contact = Some(Instant::now());
            }
            tick
        }
    }

    /// Keeps `broadcaster_health()` truthful while there is nothing to publish: one cheap broker
    /// check per poll interval.
    fn check_health_when_idle(&mut self) -> Tick {
        let due = self
            .last_contact
            .is_none_or(|t| t.elapsed() >= guc::poll_interval());
        if !due {
            return Tick::Idle;
        }
        let Some(backend) = self.backend.as_mut() else {
            return Tick::Idle;
        };
        let checked = {
            let _held = SignalsHeld::new();
            backend.health_check()
        };
        match checked {
            Ok(()) => {
                self.last_contact = Some(Instant::now());
                shared::record_success(0);
                if self.outages > 0 {
                    log!("broadcaster: {} backend reachable again", backend.name());
                    self.outages = 0;
                }
                Tick::Idle
            }
            Err(e) => Tick::Outage(e),
        }
    }

    /// The database is read-only (what managed services switch on when a disk fills): the relay
    /// could send events but not delete them, so it sends none and looks again at each poll
    /// (a reload wakes it). Said in the log once a minute at most, and in `broadcaster_status`.
    fn wait_read_only(&mut self) {
        if self.said_read_only.is_none() {
            shared::set_read_only(true);
            shared::record_failure(0, READ_ONLY);
        }
        if self
            .said_read_only
            .is_none_or(|t| t.elapsed() >= READ_ONLY_LOG_EVERY)
        {
            warning!("broadcaster: database \"{}\": {READ_ONLY}", self.database);
            self.said_read_only = Some(Instant::now());
        }
    }

    fn back_off(&mut self, error: &BackendError) {
        shared::record_failure(0, &error.to_string());
        self.outages = self.outages.saturating_add(1);
        let cap = guc::retry_max_delay().max(RETRY_BASE_DELAY);
        let exp = RETRY_BASE_DELAY
            .saturating_mul(1u32 << self.outages.min(16))
            .min(cap);
        // Full jitter in [exp/2, exp]: many clusters retrying one Redis don't stampede.
        let half = exp / 2;
        let jitter = Duration::from_micros(self.next_random() % (half.as_micros() as u64 + 1));
        let delay = half + jitter;
        self.retry_at = Some(Instant::now() + delay);
        // Commits during the backoff are claimed when it ends; waking for each is wasted work.
        shared::set_backing_off(true);
        if matches!(error, BackendError::Config(_)) {
            self.backend = None;
        }
        self.log_rate_limited(&format!(
            "broadcaster: {error}; events stay pending, retrying in {} ms",
            delay.as_millis()
        ));
    }

    fn log_rate_limited(&mut self, message: &str) {
        if self.last_log.is_some_and(|t| t.elapsed() < LOG_EVERY) {
            self.suppressed_logs += 1;
            return;
        }
        if self.suppressed_logs > 0 {
            warning!(
                "{message} ({} similar messages suppressed)",
                self.suppressed_logs
            );
        } else {
            warning!("{message}");
        }
        self.suppressed_logs = 0;
        self.last_log = Some(Instant::now());
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64: enough to spread retries, no dependency.
        let mut x = self.jitter_state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.jitter_state = x;
        x
    }
}

/// Says so when this database is a copy of the one its outbox was written in
/// (`broadcaster_origin` holds another oid): `CREATE DATABASE ... TEMPLATE` of a served database,
/// or a restore of a dump. Its events are relayed all the same: after a restore they are the
/// ones the original never sent; from a clone of a served database, events the original sends
/// too go out twice, with the same ids, for consumers to de-duplicate on `ce_id`. Then records
/// this database as the outbox's own.
fn check_origin(database: &str, schema: &str) {
    let mine = unsafe { pg_sys::MyDatabaseId };
    let q = |sql: &str| in_schema(sql, schema);
    let result = Spi::connect_mut(|client| {
        // Not there while the database still has 0.1.0's SQL (ALTER EXTENSION ... UPDATE not run).
        let present = client
            .select(
                "SELECT pg_catalog.to_regclass($1) IS NOT NULL",
                None,
                &[format!("{schema}.broadcaster_origin").into()],
            )?
            .first()
            .get_one::<bool>()?
            .unwrap_or(false);
        if !present {
            return Ok(());
        }
        let copied = client
            .select(
                &q("SELECT count(*) FROM @extschema@.broadcaster_origin WHERE database <> $1"),
                None,
                &[mine.into()],
            )?
            .first()
            .get_one::<i64>()?
            .unwrap_or(0);
        if copied > 0 {
            let pending = client
                .select(
                    &q("SELECT count(*) FROM @extschema@.broadcaster_outbox"),
                    None,
                    &[],
                )?
                .first()
                .get_one::<i64>()?
                .unwrap_or(0);
            warning!(
                "broadcaster: database \"{database}\" is a copy of another database (CREATE DATABASE ... TEMPLATE, or a restore); its {pending} events are relayed from here, so events its original also relays go out twice, with the same ids (ce_id)"
            );
            client.update(
                &q("DELETE FROM @extschema@.broadcaster_origin WHERE database <> $1"),
                None,
                &[mine.into()],
            )?;
        }
        client.update(
            &q("INSERT INTO @extschema@.broadcaster_origin SELECT $1 \
                WHERE NOT EXISTS (SELECT 1 FROM @extschema@.broadcaster_origin)"),
            None,
            &[mine.into()],
        )?;
        Ok::<_, pgrx::spi::Error>(())
    });
    if let Err(e) = result {
        warning!("broadcaster: checking whether \"{database}\" is a copy failed: {e}");
    }
}

/// Builds the configured backend with Postgres's signals held. A thread the backend starts
/// inherits that mask, so that the signals keep going to the relay's own thread, where Postgres
/// handles them.
fn build_backend(database: &str) -> Result<Box<dyn PublisherBackend>, BackendError> {
    let _held = SignalsHeld::new();
    backend::build(&guc::backend_name(), &guc::backend_config(database))
}

/// Postgres's signals held (blocked) in this thread while this lives, released (delivered) when
/// it drops, an unwinding ERROR included. Around the backend's network calls: a signal handled
/// during a socket read or write that has a timeout makes it fail with EINTR whatever
/// SA_RESTART says (signal(7)), and every `DROP DATABASE` (a ProcSignalBarrier), reload or
/// commit wake-up sends one; read as an outage, that would send the whole batch again. Held,
/// they wait at most the backend's network timeout.
struct SignalsHeld;

impl SignalsHeld {
    fn new() -> SignalsHeld {
        unsafe { pg_sys::BackgroundWorkerBlockSignals() };
        SignalsHeld
    }
}

impl Drop for SignalsHeld {
    fn drop(&mut self) {
        unsafe { pg_sys::BackgroundWorkerUnblockSignals() };
    }
}

/// Inside [`SignalsHeld`], signals released again while this lives: for work in Postgres (the
/// next claim, overlapping the send) that must stay interruptible, since it can wait for a lock.
struct SignalsReleased;

impl SignalsReleased {
    fn new() -> SignalsReleased {
        unsafe { pg_sys::BackgroundWorkerUnblockSignals() };
        SignalsReleased
    }
}

impl Drop for SignalsReleased {
    fn drop(&mut self) {
        unsafe { pg_sys::BackgroundWorkerBlockSignals() };
    }
}

/// The relay's statements, planned once per worker process.
struct Statements {
    /// The extension's schema, quoted as an identifier.
    schema: String,
    /// broadcaster_outbox, for VACUUM.
    outbox: pg_sys::Oid,
    /// One per [`Find`], indexed by it.
    claim: Vec<OwnedPreparedStatement>,
    claim_and_keep: Vec<OwnedPreparedStatement>,
    any_failure: OwnedPreparedStatement,
    retire: OwnedPreparedStatement,
    retire_and_keep: OwnedPreparedStatement,
    purge: OwnedPreparedStatement,
    fail: OwnedPreparedStatement,
    clear: OwnedPreparedStatement,
    forget: OwnedPreparedStatement,
}

/// `sql` with `@extschema@` replaced by `schema` (an identifier, quoted), as in an extension's
/// script.
fn in_schema(sql: &str, schema: &str) -> String {
    sql.replace("@extschema@", schema)
}

/// Finds the extension's schema, readies the session and prepares the relay's statements;
/// None while the extension is not installed.
fn prepare_session() -> Option<Statements> {
    // Nothing the relay runs resolves a name through a schema: the extension's may be writable
    // by other roles (public, often), and the relay runs as a superuser. So the path holds
    // pg_catalog only, and the statements name the extension's schema ([`in_schema`]). And a
    // lost commit of this session only un-deletes rows Redis already has, which are then sent
    // again with the same ids: at-least-once holds without waiting for the WAL flush of each
    // batch. And the claim stays on the primary key whatever the statistics say: planned while
    // the outbox is empty, it would otherwise become a sort of the whole table, kept for a
    // backlog. Its plan does not depend on the parameters' values: planned once, not at each
    // claim, and never compiled (a generic plan's estimates for a backlog would have JIT compile
    // it at each run: milliseconds per claim).
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
    use pg_sys::BuiltinOid::{FLOAT8OID, INT4OID, INT8ARRAYOID, INT8OID, TEXTOID};
    let sequence = Spi::get_one_with_args::<String>(
        "SELECT pg_catalog.pg_get_serial_sequence($1, 'seq')",
        &[format!("{schema}.broadcaster_outbox").into()],
    )
    .ok()
    .flatten()?;
    let q = |sql: &str| in_schema(sql, &schema).replace("@outbox_seq@", &sequence);
    Spi::connect(|client| {
        // One statement per way of finding rows, in `Find` order.
        let each_find = |sql: fn(Find) -> String| {
            Find::EACH
                .iter()
                .map(|&find| {
                    Ok(client
                        .prepare_mut(&in_schema(&sql(find), &schema), &find.arg_types())?
                        .keep())
                })
                .collect::<Result<Vec<_>, pgrx::spi::Error>>()
        };
        Ok::<_, pgrx::spi::Error>(Statements {
            schema: schema.clone(),
            outbox,
            claim: each_find(claim_sql)?,
            claim_and_keep: each_find(claim_and_keep_sql)?,
            any_failure: client.prepare_mut(&q(ANY_FAILURE), &[])?.keep(),
            retire: client.prepare_mut(&q(RETIRE), &[oid(INT8ARRAYOID)])?.keep(),
            retire_and_keep: client
                .prepare_mut(&q(RETIRE_AND_KEEP), &[oid(INT8ARRAYOID)])?
                .keep(),
            purge: client
                .prepare_mut(&q(PURGE), &[oid(FLOAT8OID), oid(INT8OID)])?
                .keep(),
            fail: client
                .prepare_mut(
                    &q(FAIL),
                    &[oid(INT8OID), oid(TEXTOID), oid(FLOAT8OID), oid(INT4OID)],
                )?
                .keep(),
            clear: client.prepare_mut(&q(CLEAR), &[oid(INT8ARRAYOID)])?.keep(),
            forget: client.prepare_mut(&q(FORGET), &[])?.keep(),
        })
    })
    .ok()
}

/// A timestamptz (microseconds since 2000-01-01 00:00 UTC) as RFC 3339, in UTC with
/// microseconds: `2026-11-27T07:00:00.123456Z`. The outbox's trigger keeps `time` within years
/// 1 to 9999.
fn rfc3339(timestamp: i64) -> String {
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
fn uuid_text(bytes: &[u8; 16]) -> String {
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

/// Claimed rows, in `seq` order: the events they carry (or why a row does not read as one).
#[derive(Default)]
struct Claimed {
    seqs: Vec<i64>,
    attempts: Vec<i32>,
    /// The rows that read as events, in order, and their places in the batch.
    events: Arc<Vec<OutboxEvent>>,
    sent: Vec<usize>,
    /// The rows that don't: place, and why.
    unreadable: Vec<(usize, String)>,
    /// The backend's encoding of `events`, made while it worked on the batch before.
    prepared: Option<Prepared>,
}

/// Batches in one transaction: at most this many, so that a crash sends at most this many
/// again (16,000 events with the default batch size), and the transaction never holds back
/// VACUUM for long (about 0.2 s while draining a backlog). Each transaction's first batch is
/// claimed and encoded while the broker waits, and its last is sent while the relay waits:
/// more batches per transaction spread that over more events, once the claims pass over the
/// rows the transaction deleted ([`Deleted`]). A/B drains against 4 batches without that: 16
/// with it, median 1.14 (10 pairs won of 11); 16 without it, 1.04; 4 with it, 1.0.
const BATCHES_PER_TRANSACTION: usize = 16;
/// While `broadcaster_failures` may hold rows: the checked claim reads every row the
/// transaction deleted again, at each claim.
const CHECKED_BATCHES_PER_TRANSACTION: usize = 4;

/// Up to [`BATCHES_PER_TRANSACTION`] batches in one transaction
/// ([`CHECKED_BATCHES_PER_TRANSACTION`] while failures may exist). Each is claimed by deleting
/// its rows, inside one subtransaction that is kept when every batch went in whole. While the
/// broker works on a full batch, the relay already claims the next one and hands it to the
/// backend to encode; it is sent once the batch before it is known to be in, so a key keeps its
/// order. When a batch does not go in whole (an event rejected or held, a row that isn't an
/// event, an outage), the subtransaction is rolled back, every claimed row is pending again,
/// and the rows known to be delivered are deleted and the failures recorded one by one.
fn relay_batch(statements: &Statements, backend: &mut dyn PublisherBackend) -> Tick {
    let batch_size = guc::batch_size();
    let checked = failures_possible(statements);
    let subxact = SubTransaction::begin();
    let mut claimed = claim(statements, batch_size, checked, Deleted::NONE);
    let mut deleted = Deleted::NONE.after(&claimed.seqs);
    let rounds = if checked {
        CHECKED_BATCHES_PER_TRANSACTION
    } else {
        BATCHES_PER_TRANSACTION
    };
    // Rows of the batches delivered whole so far.
    let mut delivered = Delivered::default();
    let mut full = false;
    for round in 1..=rounds {
        if claimed.seqs.is_empty() {
            break;
        }
        full = claimed.seqs.len() >= batch_size;
        // Claim ahead only after a full batch of events, never past the transaction's last.
        // Nor once a command needs the database alone: the relay finishes this batch and goes.
        let ahead =
            full && round < rounds && claimed.unreadable.is_empty() && !shared::asked_to_leave();
        let prepared = claimed.prepared.take();
        let mut next = None;
        let outcome = if claimed.events.is_empty() {
            Ok(Vec::new())
        } else {
            let _held = SignalsHeld::new();
            backend.publish_batch_overlapped(claimed.events.as_slice(), prepared, &mut |prepare| {
                let _released = SignalsReleased::new();
                if ahead {
                    let mut batch = claim(statements, batch_size, checked, deleted);
                    deleted = deleted.after(&batch.seqs);
                    if !batch.events.is_empty() {
                        batch.prepared = prepare.prepare(&batch.events);
                    }
                    next = Some(batch);
                }
            })
        };
        let whole = claimed.unreadable.is_empty()
            && matches!(&outcome, Ok(o) if o.iter().all(Result::is_ok));
        if !whole {
            drop(next);
            subxact.roll_back();
            return settle(statements, backend, delivered, claimed, full, outcome);
        }
        shared::record_success(claimed.seqs.len());
        for (&seq, &attempts) in claimed.seqs.iter().zip(&claimed.attempts) {
            delivered.add(seq, attempts);
        }
        claimed = next.unwrap_or_default();
    }
    subxact.commit();
    if delivered.seqs.is_empty() {
        return Tick::Idle;
    }
    if !delivered.recovered.is_empty() {
        retire(statements, &[], &delivered.recovered, &[]);
    }
    Tick::Published {
        full,
        retired: delivered.seqs.len(),
    }
}

/// A run of `seq`s, `lo` to `hi`, every one of which the relay has deleted in its current
/// transaction, so none can be ready: its next claim passes over them without reading their
/// rows. Only the relay's own deletes: a row below `lo` that was not visible to one claim (its
/// transaction still running) may be to the next, and is found there in its place.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Deleted {
    lo: i64,
    hi: i64,
}

impl Deleted {
    /// No row: below `i64::MAX` and above the one below it is everything.
    const NONE: Deleted = Deleted {
        lo: i64::MAX,
        hi: i64::MAX - 1,
    };

    fn len(self) -> i64 {
        self.hi.saturating_sub(self.lo).saturating_add(1).max(0)
    }

    /// The run after a claim also deleted `seqs` (ascending): this one grown by those that
    /// follow on from its end, or the longest run in `seqs` when that is longer.
    fn after(self, seqs: &[i64]) -> Deleted {
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

/// Rows delivered in this transaction, and those of them that had failed before.
#[derive(Default)]
struct Delivered {
    seqs: Vec<i64>,
    recovered: Vec<i64>,
}

impl Delivered {
    fn add(&mut self, seq: i64, attempts: i32) {
        self.seqs.push(seq);
        if attempts > 0 {
            self.recovered.push(seq);
        }
    }
}

/// After the claims were undone: deletes the rows delivered (`delivered`, and the events of
/// `batch` that went in), counts a failed attempt against each rejected or unreadable row, and
/// leaves the rest pending. When `batch` was `full`, more rows may be ready behind it.
fn settle(
    statements: &Statements,
    backend: &mut dyn PublisherBackend,
    mut delivered: Delivered,
    batch: Claimed,
    full: bool,
    outcome: Result<BatchOutcome, BackendError>,
) -> Tick {
    let Claimed {
        seqs,
        attempts,
        events,
        sent,
        unreadable: mut failed,
        ..
    } = batch;
    let before = delivered.seqs.len();
    let outcome = match outcome {
        Ok(outcome) => Ok(outcome),
        // Not the events' fault: the batch stays pending.
        Err(e) if e.is_unavailable() => Err(e),
        // Refused as a whole, but not for an outage: one event may be the cause. One at a
        // time, the culprit gets its own failed attempts instead of stalling everything.
        Err(_) => {
            let _held = SignalsHeld::new();
            backend::publish_each(backend, &events)
        }
    };
    let mut outage = None;
    match outcome {
        Err(e) => outage = Some(e),
        Ok(outcome) => {
            for (i, result) in sent.into_iter().zip(outcome) {
                match result {
                    Ok(()) => delivered.add(seqs[i], attempts[i]),
                    // Behind a failed event of its key: stays pending, untouched.
                    Err(BackendError::Held) => {}
                    // Not this event's fault: it stays pending, untouched.
                    Err(e) if e.is_unavailable() => outage = Some(e),
                    Err(e) => failed.push((i, e.to_string())),
                }
            }
        }
    }
    let failed: Vec<(i64, i32, String)> = failed
        .into_iter()
        .map(|(i, e)| (seqs[i], attempts[i], e))
        .collect();
    retire(statements, &delivered.seqs, &delivered.recovered, &failed);
    shared::record_success(delivered.seqs.len() - before);
    if let Some((_, _, error)) = failed.last() {
        shared::record_failure(failed.len(), error);
    }
    match outage {
        Some(e) => Tick::Outage(e),
        None if delivered.seqs.is_empty() && failed.is_empty() => Tick::Idle,
        None => Tick::Published {
            full,
            retired: delivered.seqs.len(),
        },
    }
}

/// An internal subtransaction of the relay's transaction, as procedural languages open them
/// around a block that may be undone.
struct SubTransaction {
    context: pg_sys::MemoryContext,
    owner: pg_sys::ResourceOwner,
}

impl SubTransaction {
    fn begin() -> Self {
        unsafe {
            let context = pg_sys::CurrentMemoryContext;
            let owner = pg_sys::CurrentResourceOwner;
            pg_sys::BeginInternalSubTransaction(std::ptr::null());
            pg_sys::MemoryContextSwitchTo(context);
            SubTransaction { context, owner }
        }
    }

    fn commit(self) {
        unsafe {
            pg_sys::ReleaseCurrentSubTransaction();
            self.restore();
        }
    }

    fn roll_back(self) {
        unsafe {
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
            self.restore();
        }
    }

    unsafe fn restore(&self) {
        unsafe {
            pg_sys::MemoryContextSwitchTo(self.context);
            pg_sys::CurrentResourceOwner = self.owner;
        }
    }
}

/// `VACUUM (SKIP_LOCKED, TRUNCATE false) broadcaster_outbox`, run by the relay between its
/// transactions, as a session would run it: VACUUM commits its own transactions. Skipped while
/// autovacuum holds the table; never truncates, which would lock out producers.
fn vacuum_outbox(outbox: pg_sys::Oid) {
    // VACUUM commits the transaction it is called in: its statement lives in a context of its
    // own, not in that transaction's.
    let mut context = PgMemoryContexts::new("broadcaster vacuum");
    unsafe {
        pg_sys::StartTransactionCommand();
        let stmt = context.switch_to(|_| {
            let option = |name: &str, value: &str| {
                pg_sys::makeDefElem(
                    name.as_pg_cstr(),
                    pg_sys::makeString(value.as_pg_cstr()).cast(),
                    -1,
                )
            };
            let mut options = std::ptr::null_mut();
            options = pg_sys::lappend(options, option("skip_locked", "true").cast());
            options = pg_sys::lappend(options, option("truncate", "false").cast());
            let relation =
                pg_sys::makeVacuumRelation(std::ptr::null_mut(), outbox, std::ptr::null_mut());
            let stmt = pg_sys::palloc0(std::mem::size_of::<pg_sys::VacuumStmt>())
                .cast::<pg_sys::VacuumStmt>();
            (*stmt).type_ = pg_sys::NodeTag::T_VacuumStmt;
            (*stmt).options = options;
            (*stmt).rels = pg_sys::lappend(std::ptr::null_mut(), relation.cast());
            (*stmt).is_vacuumcmd = true;
            stmt
        });
        pg_sys::ExecVacuum(pg_sys::make_parsestate(std::ptr::null_mut()), stmt, true);
        pg_sys::CommitTransactionCommand();
    }
}

/// Columns of [`claimed`].
const CLAIM_COLUMNS: usize = 13;

/// Claims up to `limit` ready rows (see [`claim_sql`]), checking `broadcaster_failures` when
/// `checked`, otherwise passing over the rows `deleted` earlier in this transaction.
fn claim(statements: &Statements, limit: usize, checked: bool, deleted: Deleted) -> Claimed {
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
    Spi::connect_mut(|client| {
        let args = match find {
            Find::All => vec![limit.into()],
            Find::Ready => vec![limit.into(), guc::dead_event_holds_key().into()],
            Find::AllPast => vec![limit.into(), deleted.lo.into(), deleted.hi.into()],
        };
        let args = args.as_slice();
        // Read below through SPI_tuptable, which lives until SPI_finish.
        let n = client.update(statement, None, args)?.len();
        let table = unsafe { pg_sys::SPI_tuptable };
        if n == 0 || table.is_null() {
            return Ok(Claimed::default());
        }
        let tupdesc = unsafe { (*table).tupdesc };
        // Through pgrx's accessor: PostgreSQL 18 reaches a tuple descriptor's attributes by a
        // function (TupleDescAttr), not the `attrs` array of earlier versions.
        let columns = unsafe { pgrx::PgTupleDesc::from_pg_unchecked(tupdesc) };
        let type_of = |c: usize| columns.get(c).map_or(pg_sys::InvalidOid, |a| a.atttypid);
        if columns.len() != CLAIM_COLUMNS
            || type_of(1) != pg_sys::UUIDOID
            || type_of(5) != pg_sys::TIMESTAMPTZOID
            || type_of(8) != pg_sys::JSONOID
        {
            return Err(pgrx::spi::SpiErrorCodes::NoAttribute.into());
        }
        // Each row is deformed once and its text read in place: pgrx's row accessors fetch every
        // column on its own, each walking the row from its first column.
        let mut rows = Vec::with_capacity(n);
        let mut values = [pg_sys::Datum::from(0usize); CLAIM_COLUMNS];
        let mut nulls = [true; CLAIM_COLUMNS];
        for i in 0..n {
            unsafe {
                pg_sys::heap_deform_tuple(
                    *(*table).vals.add(i),
                    tupdesc,
                    values.as_mut_ptr(),
                    nulls.as_mut_ptr(),
                );
            }
            // SAFETY: the columns are text (or json) where read as text (see `claimed`), and
            // live until SPI_finish, after this loop.
            let text = |c: usize| (!nulls[c]).then(|| unsafe { text_datum(values[c]) });
            // int8, int4 and timestamptz, passed by value.
            let int = |c: usize| {
                if nulls[c] {
                    0
                } else {
                    values[c].value() as i64
                }
            };
            // The key goes with the error: the key's later rows must wait behind this one.
            let extensions = match text(10) {
                Some(json) if json != "{}" => serde_json::from_str(&json)
                    .map_err(|_| ("extensions must be a JSON object".to_string(), text(9))),
                _ => Ok(Default::default()),
            };
            let event = extensions.map(|extensions| OutboxEvent {
                // SAFETY: a uuid datum points to its 16 bytes.
                id: if nulls[1] {
                    String::new()
                } else {
                    uuid_text(unsafe { &*values[1].cast_mut_ptr::<[u8; 16]>() })
                },
                ty: text(2).unwrap_or_default(),
                source: text(3).unwrap_or_default(),
                subject: text(4),
                time: if nulls[5] {
                    String::new()
                } else {
                    rfc3339(int(5))
                },
                datacontenttype: text(6).unwrap_or_default(),
                dataschema: text(7),
                data: text(8),
                partition_key: text(9),
                extensions,
                stream: text(11),
            });
            rows.push((int(0), int(12) as i32, event));
        }
        if !rows.is_sorted_by_key(|r| r.0) {
            rows.sort_unstable_by_key(|r| r.0);
        }
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

/// The characters of a text datum. Bytes that are not UTF-8 (a database in another encoding)
/// are replaced, never trusted.
///
/// # Safety
/// `datum` must be a non-null text (or other varlena) datum.
unsafe fn text_datum(datum: pg_sys::Datum) -> String {
    unsafe {
        let text = pg_sys::pg_detoast_datum_packed(datum.cast_mut_ptr());
        let bytes = std::slice::from_raw_parts(
            pgrx::varlena::vardata_any(text).cast::<u8>(),
            pgrx::varlena::varsize_any_exhdr(text),
        );
        match std::str::from_utf8(bytes) {
            Ok(text) => text.to_owned(),
            Err(_) => String::from_utf8_lossy(bytes).into_owned(),
        }
    }
}

/// Drops published events past `broadcaster.retention`, a few small batches per idle pass.
fn purge(statements: &Statements) {
    let retention = guc::retention();
    if retention.is_zero() {
        return;
    }
    let result = Spi::connect_mut(|client| {
        for _ in 0..10 {
            let deleted = client
                .update(
                    &statements.purge,
                    None,
                    &[retention.as_secs_f64().into(), PURGE_BATCH.into()],
                )?
                .len();
            if (deleted as i64) < PURGE_BATCH {
                break;
            }
        }
        Ok::<_, pgrx::spi::Error>(())
    });
    if let Err(e) = result {
        warning!("broadcaster: purging published events failed: {e}");
    }
}

/// Whether the claim must check `broadcaster_failures` ([`FAILURES_POSSIBLE`]): asks the table
/// only while it may hold something.
fn failures_possible(statements: &Statements) -> bool {
    if !FAILURES_POSSIBLE.load(Ordering::Relaxed) {
        return false;
    }
    let any = Spi::connect(|client| {
        client
            .select(&statements.any_failure, None, &[])?
            .first()
            .get_one::<bool>()
    });
    // Unknown counts as possible: checking costs time, not correctness.
    let possible = !matches!(any, Ok(Some(false)));
    FAILURES_POSSIBLE.store(possible, Ordering::Relaxed);
    possible
}

/// Forgets failures whose row is gone: see [`FORGET`].
fn forget_orphan_failures(statements: &Statements) {
    let result = Spi::connect_mut(|client| {
        client.update(&statements.forget, None, &[])?;
        Ok::<_, pgrx::spi::Error>(())
    });
    if let Err(e) = result {
        warning!("broadcaster: forgetting failures of deleted events failed: {e}");
    }
}

/// Deletes what was published (by `seq`), forgets the failures of the `recovered` among them,
/// and counts an attempt against each failed row (seq, attempts so far, error), scheduling its
/// retry or marking it dead.
fn retire(
    statements: &Statements,
    published: &[i64],
    recovered: &[i64],
    failed: &[(i64, i32, String)],
) {
    let max_attempts = guc::max_attempts();
    let cap = guc::retry_max_delay().max(RETRY_BASE_DELAY);
    let result = Spi::connect_mut(|client| {
        if !published.is_empty() {
            let retire = if guc::retention().is_zero() {
                &statements.retire
            } else {
                &statements.retire_and_keep
            };
            client.update(retire, None, &[published.to_vec().into()])?;
        }
        if !recovered.is_empty() {
            client.update(&statements.clear, None, &[recovered.to_vec().into()])?;
        }
        if !failed.is_empty() {
            FAILURES_POSSIBLE.store(true, Ordering::Relaxed);
        }
        for (seq, attempts, error) in failed {
            // The event's own backoff: 1 s, 2 s, 4 s ... up to the cap.
            let delay = Duration::from_secs(1u64 << (*attempts).clamp(0, 20)).min(cap);
            client.update(
                &statements.fail,
                None,
                &[
                    (*seq).into(),
                    error.as_str().into(),
                    delay.as_secs_f64().into(),
                    max_attempts.into(),
                ],
            )?;
        }
        Ok::<_, pgrx::spi::Error>(())
    });
    if let Err(e) = result {
        // Abort: the batch stays pending and goes out again (same ids), rather than this
        // transaction committing as if it had been retired.
        error!("broadcaster: recording delivery results failed: {e}");
    }
}

#[cfg(test)]
mod unit_tests {
    use super::Deleted;

    fn run(lo: i64, hi: i64) -> Deleted {
        Deleted { lo, hi }
    }

    #[test]
    fn the_deleted_run_grows_only_by_seqs_that_follow_on() {
        // A first claim: the longest run, not the first.
        let first = Deleted::NONE.after(&[3, 10, 11, 12, 20]);
        assert_eq!(first, run(10, 12));
        // A next claim continuing it grows it, up to its first gap.
        assert_eq!(first.after(&[13, 14, 16]), run(10, 14));
        // Rows below the run (committed since) and a gap right after it leave it as it is.
        assert_eq!(first.after(&[1, 2, 14, 15]), run(10, 12));
        // A longer run elsewhere replaces it.
        assert_eq!(first.after(&[30, 31, 32, 33]), run(30, 33));
        // Nothing claimed: nothing passed over; and no overflow at the end of bigint.
        assert_eq!(Deleted::NONE.after(&[]), Deleted::NONE);
        assert_eq!(Deleted::NONE.after(&[7]), run(7, 7));
        assert_eq!(
            run(i64::MAX - 1, i64::MAX).after(&[1]),
            run(i64::MAX - 1, i64::MAX)
        );
        assert_eq!(Deleted::NONE.len(), 0);
    }

    #[test]
    fn timestamps_become_rfc3339_in_utc() {
        use super::rfc3339;
        let day = 86_400 * 1_000_000_i64;
        assert_eq!(rfc3339(0), "2000-01-01T00:00:00.000000Z");
        assert_eq!(rfc3339(-1), "1999-12-31T23:59:59.999999Z");
        assert_eq!(rfc3339(-10_957 * day), "1970-01-01T00:00:00.000000Z");
        // 2024-02-29 07:08:09.123456, a leap day.
        let leap = (8_825 * 86_400 + 7 * 3_600 + 8 * 60 + 9) * 1_000_000 + 123_456;
        assert_eq!(rfc3339(leap), "2024-02-29T07:08:09.123456Z");
        // The outbox's bounds: '0001-01-01 00:00:00+00' and '9999-12-31 23:59:59.999999+00'.
        assert_eq!(
            rfc3339(-63_082_281_600_000_000),
            "0001-01-01T00:00:00.000000Z"
        );
        assert_eq!(
            rfc3339(252_455_615_999_999_999),
            "9999-12-31T23:59:59.999999Z"
        );
        // Past them (a row written with the trigger disabled): no time, and no panic.
        for outside in [
            i64::MIN,
            -63_082_281_600_000_001,
            252_455_616_000_000_000,
            i64::MAX,
        ] {
            assert!(!rfc3339(outside).contains('T'), "{outside}");
        }
    }

    #[test]
    fn uuids_in_canonical_form() {
        let bytes = [
            0x7d, 0x2c, 0x5b, 0xd4, 0x4f, 0x7e, 0x4a, 0x53, 0x8d, 0x4c, 0x5d, 0x1d, 0x7a, 0x1c,
            0x0e, 0x11,
        ];
        assert_eq!(
            super::uuid_text(&bytes),
            "7d2c5bd4-4f7e-4a53-8d4c-5d1d7a1c0e11"
        );
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    /// The relay's statement `sql`, naming the extension's schema as the relay does.
    fn ours(sql: &str) -> String {
        let schema = Spi::get_one::<String>(
            "SELECT quote_ident(n.nspname) FROM pg_extension e \
               JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'broadcaster'",
        )
        .expect("query")
        .expect("the extension's schema");
        super::in_schema(sql, &schema)
    }

    /// How many rows [`super::READY`] finds, 10 at most, dead events holding their key.
    fn ready() -> i64 {
        Spi::get_one_with_args::<i64>(
            &format!("SELECT count(*) FROM ({}) r", ours(super::READY)),
            &[10_i64.into(), true.into()],
        )
        .expect("query")
        .unwrap_or(-1)
    }

    #[pg_test]
    fn a_failure_holds_its_key_only_while_its_row_is_there() {
        Spi::run("INSERT INTO broadcaster_outbox (type, partition_key) VALUES ('a', 'k'), ('b', 'k'), ('c', 'j')")
            .expect("rows");
        assert_eq!(ready(), 3);
        // The first row of k failed, its retry not due: k waits, j goes.
        Spi::run(
            "INSERT INTO broadcaster_failures (seq, partition_key, attempts, next_attempt_at, dead, last_error) \
             SELECT seq, 'k', 1, now() + interval '1 hour', false, 'WRONGTYPE' \
               FROM broadcaster_outbox WHERE type = 'a'",
        )
        .expect("failure");
        assert_eq!(ready(), 1);
        // Deleted by hand: its failure, until forgotten, holds nothing.
        Spi::run("DELETE FROM broadcaster_outbox WHERE type = 'a'").expect("delete");
        assert_eq!(ready(), 2);
        // Nor one whose row took another key since.
        Spi::run(
            "INSERT INTO broadcaster_outbox (type, partition_key) VALUES ('d', 'k'); \
             INSERT INTO broadcaster_failures (seq, partition_key, attempts, next_attempt_at, dead, last_error) \
             SELECT seq, 'k', 1, now() - interval '1 hour', true, 'WRONGTYPE' \
               FROM broadcaster_outbox WHERE type = 'b'; \
             UPDATE broadcaster_outbox SET partition_key = 'moved' WHERE type = 'b'",
        )
        .expect("moved");
        // b is dead (not ready); d, of k, no longer waits behind it; c goes.
        assert_eq!(ready(), 2);
    }

    /// The seqs [`super::ALL_PAST`] finds, 10 at most, passing over `lo` to `hi`.
    fn all_but(lo: i64, hi: i64) -> Vec<i64> {
        let sql = format!(
            "SELECT array_agg(o.seq ORDER BY o.seq) FROM broadcaster_outbox o \
              WHERE o.ctid = ANY (ARRAY({}))",
            ours(super::ALL_PAST)
        );
        Spi::get_one_with_args::<Vec<i64>>(&sql, &[10_i64.into(), lo.into(), hi.into()])
            .expect("query")
            .unwrap_or_default()
    }

    #[pg_test]
    fn the_claim_passes_over_only_the_rows_named() {
        Spi::run(
            "INSERT INTO broadcaster_outbox (seq, type) OVERRIDING SYSTEM VALUE \
             SELECT g, 'e' FROM generate_series(1, 12) g",
        )
        .expect("rows");
        let none = super::Deleted::NONE;
        assert_eq!(all_but(none.lo, none.hi), (1..=10).collect::<Vec<_>>());
        // Rows before the run (a transaction that committed late) come first, in order.
        assert_eq!(all_but(3, 6), vec![1, 2, 7, 8, 9, 10, 11, 12]);
        assert_eq!(all_but(1, 12), Vec::<i64>::new());
        // Both scans together find more than the limit: the first 10 in order.
        assert_eq!(all_but(11, 11), (1..=10).collect::<Vec<_>>());
        assert_eq!(all_but(2, 2), vec![1, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
        assert_eq!(
            all_but(i64::MAX - 1, i64::MAX),
            (1..=10).collect::<Vec<_>>()
        );
    }

    #[pg_test]
    fn truncating_the_outbox_forgets_its_failures() {
        Spi::run(
            "INSERT INTO broadcaster_outbox (type) VALUES ('a'); \
             INSERT INTO broadcaster_failures (seq, attempts, next_attempt_at, dead, last_error) \
             SELECT seq, 1, now(), true, 'x' FROM broadcaster_outbox; \
             TRUNCATE broadcaster_outbox RESTART IDENTITY",
        )
        .expect("truncate");
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM broadcaster_failures").expect("count"),
            Some(0)
        );
    }
}
