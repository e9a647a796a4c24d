//! A relay: a worker connected to one database that relays the events of one backend, the
//! default one (`broadcaster.*` settings) or a named one (a foreign server of the
//! `broadcaster` wrapper). The default backend's relay also starts a relay for each server, so
//! that one backend's outage never delays another's events. Woken by committing producers; a
//! slow poll is only a safety net.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerStatus, DynamicBackgroundWorker, SignalWakeFlags,
};
use pgrx::prelude::*;

use super::batch::{relay_batch, relay_in_transaction};
use super::claim::{in_schema, outbox_got_backend, prepare_session, Scope, Statements};
use super::housekeeping::{self, Vacuum};
use super::launcher::launch_relay;
use super::{function, Tick, RESTART_DELAY, RETRY_BASE_DELAY};
use crate::backend::{BatchError, Kind, Options, PublisherBackend, KIND_OPTION};
use crate::pg::{self, SignalsHeld};
use crate::{guc, shared};

/// Least time from one small batch to the next. Under a stream of small transactions the relay
/// then takes their events a few at a time, not one claim, round trip and commit per producer
/// commit, which would take a core from the producers. Events committed further apart than
/// this go out at once.
const COALESCE: Duration = Duration::from_millis(1);
/// At most one log line per this interval for a repeating failure.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// At most one log line per this interval while the database is read-only.
const READ_ONLY_LOG_EVERY: Duration = Duration::from_secs(60);
/// How often the default backend's relay lists the servers, to start a relay for a new one.
/// (A server's relay reads its server again in each claim's transaction.)
const SERVER_CHECK: Duration = Duration::from_secs(1);

/// The first half of each relay's advisory lock key (`pg_locks.classid`): "bcas". The second
/// is its server's oid, 0 for the default backend.
const RELAY_LOCK: i64 = 0x6263_6173;

/// The option that confines a backend's streams, where a kind has one.
const STREAM_PREFIX: &str = "stream_prefix";

/// Why a read-only database's events wait: `broadcaster_status.last_error` and the log.
const READ_ONLY: &str =
    "the database is read-only (default_transaction_read_only is on); events wait until it is writable";

/// Whether the outbox holds events of the named backend `$1`: one probe of the outbox's index
/// of named backends' events.
const PENDING: &str =
    "SELECT EXISTS (SELECT 1 FROM @extschema@.broadcaster_outbox o WHERE o.backend = $1)";

/// Whether the outbox holds events naming a backend that has no server: one index probe per
/// backend named (a loose index scan), not a scan of the events.
const ORPHANED: &str = "
WITH RECURSIVE b(name) AS (
    SELECT min(o.backend) FROM @extschema@.broadcaster_outbox o WHERE o.backend IS NOT NULL
    UNION ALL
    SELECT (SELECT min(o.backend) FROM @extschema@.broadcaster_outbox o WHERE o.backend > b.name)
      FROM b WHERE b.name IS NOT NULL)
SELECT EXISTS (
    SELECT 1 FROM b
     WHERE b.name IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_foreign_server s
                         JOIN pg_catalog.pg_foreign_data_wrapper w ON w.oid = s.srvfdw
                        WHERE w.fdwname = 'broadcaster' AND s.srvname = b.name))";

/// The servers of the `broadcaster` wrapper in this database: oid and name.
const SERVERS: &str = "
SELECT s.oid, s.srvname::text
  FROM pg_catalog.pg_foreign_server s
  JOIN pg_catalog.pg_foreign_data_wrapper w ON w.oid = s.srvfdw
 WHERE w.fdwname = 'broadcaster'
 ORDER BY s.oid";

/// One server of the `broadcaster` wrapper: name, options, and the options of the user mapping
/// for the relay's role (or PUBLIC), which override the server's.
const SERVER: &str = "
SELECT s.srvname::text, s.srvoptions,
       (SELECT um.umoptions FROM pg_catalog.pg_user_mapping um
         WHERE um.umserver = s.oid
           AND um.umuser IN (0, (SELECT r.oid FROM pg_catalog.pg_roles r
                                  WHERE r.rolname = current_user))
         ORDER BY um.umuser DESC LIMIT 1)
  FROM pg_catalog.pg_foreign_server s
  JOIN pg_catalog.pg_foreign_data_wrapper w ON w.oid = s.srvfdw
 WHERE s.oid = $1 AND w.fdwname = 'broadcaster'";

/// A server's definition as the relay last read it.
#[derive(Clone, PartialEq, Debug)]
pub struct ServerDefinition {
    pub name: String,
    pub kind: String,
    /// Its options but `backend`, then its user mapping's.
    pub options: Vec<(String, String)>,
}

/// `name=value` entries of a catalog's options array, as PostgreSQL stores them.
fn option_pairs(entries: Option<Vec<Option<String>>>) -> Vec<(String, String)> {
    entries
        .unwrap_or_default()
        .into_iter()
        .flatten()
        .filter_map(|entry| {
            let (name, value) = entry.split_once('=')?;
            Some((name.to_string(), value.to_string()))
        })
        .collect()
}

/// The definition of server `oid`; None once it is dropped. Inside a transaction.
fn read_server(oid: u32) -> Option<ServerDefinition> {
    let row = Spi::connect(|client| {
        let rows = client.select(SERVER, Some(1), &[pg_sys::Oid::from(oid).into()])?;
        let Some(row) = rows.into_iter().next() else {
            return Ok(None);
        };
        Ok::<_, pgrx::spi::Error>(Some((
            row.get::<String>(1)?.unwrap_or_default(),
            row.get::<Vec<Option<String>>>(2)?,
            row.get::<Vec<Option<String>>>(3)?,
        )))
    });
    let (name, server, mapping) = match row {
        Ok(Some(row)) => row,
        Ok(None) => return None,
        Err(e) => {
            warning!("broadcaster: reading server {oid} failed: {e}");
            return None;
        }
    };
    let mut options = option_pairs(server);
    let kind = options
        .iter()
        .position(|(n, _)| n == KIND_OPTION)
        .map(|i| options.remove(i).1)
        .unwrap_or_default();
    options.extend(option_pairs(mapping));
    Some(ServerDefinition {
        name,
        kind,
        options,
    })
}

/// What became of a relay's server since its definition `known` was read.
enum ServerChange {
    Same,
    Changed(ServerDefinition),
    /// Dropped, or renamed: its events name it by the name the claim was prepared with.
    Gone,
}

/// Reads server `oid` again and compares it with `known`. Inside a transaction.
fn server_change(oid: u32, known: Option<&ServerDefinition>) -> ServerChange {
    match read_server(oid) {
        None => ServerChange::Gone,
        Some(now) if known.is_some_and(|k| k.name != now.name) => ServerChange::Gone,
        Some(now) if Some(&now) != known => ServerChange::Changed(now),
        Some(_) => ServerChange::Same,
    }
}

/// The servers of the `broadcaster` wrapper in this database. Inside a transaction.
fn list_servers() -> Vec<(u32, String)> {
    let listed = Spi::connect(|client| {
        client
            .select(SERVERS, None, &[])?
            .map(|row| {
                Ok((
                    row.get::<pg_sys::Oid>(1)?.map_or(0, |o| o.to_u32()),
                    row.get::<String>(2)?.unwrap_or_default(),
                ))
            })
            .collect::<Result<Vec<_>, pgrx::spi::Error>>()
    });
    listed.unwrap_or_else(|e| {
        warning!("broadcaster: listing the broadcaster servers failed: {e}");
        Vec::new()
    })
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn broadcaster_relay_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let oid = pg_sys::Oid::from(u32::try_from(arg.value()).unwrap_or(0));
    let server: u32 = BackgroundWorker::get_extra().trim().parse().unwrap_or(0);
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(oid), None);
    // A catalog lookup: only inside a transaction.
    let database = BackgroundWorker::transaction(pg::my_database_name);
    // Started for a database by oid, which a RENAME may have given another name since: served
    // only under a name that is listed.
    if !guc::databases().contains(&database) {
        log!("broadcaster: database \"{database}\" is not listed in broadcaster.database; its relay leaves");
        return;
    }
    let definition = if server == 0 {
        None
    } else {
        match BackgroundWorker::transaction(|| read_server(server)) {
            Some(definition) => Some(definition),
            None => {
                log!("broadcaster: server {server} of database \"{database}\" is gone; its relay leaves");
                return;
            }
        }
    };
    let scope = match &definition {
        None => Scope::Default,
        Some(d) => Scope::Named(d.name.clone()),
    };
    // Without the extension, the relay leaves at once: waiting connected would hold the
    // database (no CREATE DATABASE ... TEMPLATE of it, no DROP). The launcher starts it again
    // when a CREATE EXTENSION commits there, or after a while.
    let Some(statements) = BackgroundWorker::transaction(|| prepare_session(scope)) else {
        if server == 0 {
            shared::note_extension_absent(pg::my_database());
        }
        return;
    };
    // One relay per database and backend, whatever races start a second one (a restarted
    // launcher or default relay that lost track of what it started): a session lock, held until
    // this process ends.
    let key = (RELAY_LOCK << 32) | i64::from(server);
    let alone = BackgroundWorker::transaction(|| {
        Spi::get_one_with_args::<bool>("SELECT pg_catalog.pg_try_advisory_lock($1)", &[key.into()])
            .ok()
            .flatten()
            .unwrap_or(false)
    });
    if !alone {
        log!("broadcaster: database \"{database}\" is already relayed{} by another process; this relay leaves", match &definition {
            Some(d) => format!(" for backend \"{}\"", d.name),
            None => String::new(),
        });
        return;
    }
    // However this process ends (an ERROR included), its slot stops claiming a live relay.
    pg::before_exit(on_relay_exit);
    let (backend, kind) = match &definition {
        None => (String::new(), guc::backend_name()),
        Some(d) => (d.name.clone(), d.kind.clone()),
    };
    let named = match &definition {
        None => String::new(),
        Some(d) => format!(" for backend \"{}\"", d.name),
    };
    match shared::relay_started(pg::my_database(), server, &backend, &kind) {
        shared::Started::Slot => {}
        // Without a slot, a relay would hear neither DROP DATABASE nor commits, and another relay
        // for the same backend could start beside it.
        shared::Started::NoSlot => {
            warning!(
                "broadcaster: no free relay slot ({} in all); \"{database}\"{named} is not relayed until one is free",
                shared::MAX_RELAYS
            );
            return;
        }
        shared::Started::AlreadyServed(pid) => {
            log!("broadcaster: database \"{database}\"{named} is already relayed by process {pid}; this relay leaves");
            return;
        }
    }
    if server != 0 {
        // Unknown until its first pass: counted as pending, so health waits for it.
        shared::set_pending(true);
    }
    log!("broadcaster: relay worker serving database \"{database}\"{named}");

    let mut relay = Relay::new(database, statements, server, definition);
    relay.run();

    shared::relay_stopped();
    log!("broadcaster: relay worker stopped");
}

#[pg_guard]
unsafe extern "C-unwind" fn on_relay_exit(_code: std::ffi::c_int, _arg: pg_sys::Datum) {
    shared::relay_stopped();
}

/// The backend as the relay built it.
struct Sink {
    backend: Box<dyn PublisherBackend>,
    /// It writes in the relay's transaction (`function`): claimed rows are not deleted before
    /// it runs, and it runs with signals deliverable.
    transactional: bool,
}

struct Relay {
    database: String,
    /// The server relayed to; 0 for the default backend.
    server: u32,
    /// Its definition as last read; None for the default backend.
    definition: Option<ServerDefinition>,
    last_server_check: Instant,
    /// The default backend's relay: the relays it started for the servers, by server oid.
    siblings: HashMap<u32, (DynamicBackgroundWorker, Instant)>,
    said_no_worker: bool,
    sink: Option<Sink>,
    /// The relay's statements, prepared when it started.
    statements: Statements,
    /// When the relay last said its database is read-only; None while it is writable.
    said_read_only: Option<Instant>,
    /// The backend's warning as last logged and shown.
    warning: Option<String>,
    /// Whether the origin check has run: once, at the first writable pass.
    origin_checked: bool,
    /// Consecutive outages, for the backoff.
    outages: u32,
    retry_at: Option<Instant>,
    last_contact: Option<Instant>,
    /// When the last batch that emptied the queue started.
    last_small_batch: Option<Instant>,
    last_purge: Option<Instant>,
    last_forget: Option<Instant>,
    vacuum: Vacuum,
    last_log: Option<Instant>,
    suppressed_logs: u32,
    jitter_state: u64,
}

impl Relay {
    fn new(
        database: String,
        statements: Statements,
        server: u32,
        definition: Option<ServerDefinition>,
    ) -> Self {
        Relay {
            database,
            server,
            definition,
            last_server_check: Instant::now(),
            siblings: HashMap::new(),
            said_no_worker: false,
            sink: None,
            statements,
            said_read_only: None,
            warning: None,
            origin_checked: false,
            outages: 0,
            retry_at: None,
            last_contact: None,
            last_small_batch: None,
            last_purge: None,
            last_forget: None,
            vacuum: Vacuum::new(),
            last_log: None,
            suppressed_logs: 0,
            jitter_state: u64::from(pg::my_pid().unsigned_abs()) | 1,
        }
    }

    /// `backend "name"` for a named backend's relay; empty for the default's.
    fn named(&self) -> String {
        match &self.definition {
            Some(d) => format!(" backend \"{}\"", d.name),
            None => String::new(),
        }
    }

    /// `backend "name": ` for a named backend's messages; empty for the default's.
    fn named_prefix(&self) -> String {
        named_prefix(self.definition.as_ref().map(|d| d.name.as_str()))
    }

    fn run(&mut self) {
        let mut more = false;
        // The servers' relays start with the default's.
        let mut servers_due = true;
        while BackgroundWorker::wait_latch(Some(self.sleep_time(more))) {
            if BackgroundWorker::sighup_received() {
                pg::reload_configuration();
                // Rebuilt from the new settings on the next pass.
                self.sink = None;
                self.retry_at = None;
                if self.server != 0 && !guc::databases().contains(&self.database) {
                    log!(
                        "broadcaster: database \"{}\" is no longer listed in broadcaster.database; the relay of{} leaves",
                        self.database,
                        self.named()
                    );
                    break;
                }
            }
            if shared::asked_to_leave() {
                log!(
                    "broadcaster: relay leaves database \"{}\" while a command needs it alone (DROP, RENAME or copy of the database)",
                    self.database
                );
                break;
            }
            if servers_due || self.last_server_check.elapsed() >= SERVER_CHECK {
                servers_due = false;
                self.last_server_check = Instant::now();
                self.follow_servers();
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
                Tick::Reconfigured => true,
                Tick::ServerGone => {
                    let name = self.definition.as_ref().map_or("", |d| d.name.as_str());
                    log!(
                        "broadcaster: server \"{name}\" of database \"{}\" was dropped or renamed; its relay leaves, and its pending events wait for a server of that name",
                        self.database
                    );
                    break;
                }
            };
        }
    }

    /// The default backend's relay starts a relay for each server that has none running.
    fn follow_servers(&mut self) {
        if self.server != 0 || pg::read_only() || shared::is_aside(pg::my_database()) {
            return;
        }
        if self.statements.scope == Scope::Unscoped {
            // The outbox is 0.1.0's until ALTER EXTENSION ... UPDATE adds `backend`: then the
            // claim is prepared again, for the default backend's events only.
            let updated = BackgroundWorker::transaction(|| outbox_got_backend(&self.statements));
            let prepared = updated
                .then(|| BackgroundWorker::transaction(|| prepare_session(Scope::Default)))
                .flatten();
            if let Some(statements) = prepared {
                log!(
                    "broadcaster: the outbox of database \"{}\" has named backends now; the relay claims the default backend's events only",
                    self.database
                );
                self.statements = statements;
            }
            return;
        }
        let schema = &self.statements.schema;
        let (orphaned, servers) = BackgroundWorker::transaction(|| {
            let orphaned = Spi::get_one::<bool>(&in_schema(ORPHANED, schema))
                .ok()
                .flatten();
            (orphaned, list_servers())
        });
        shared::set_pending(orphaned.unwrap_or(false));
        self.siblings
            .retain(|oid, _| servers.iter().any(|(listed, _)| listed == oid));
        let database = pg::my_database();
        for (oid, name) in servers {
            if let Some((worker, started)) = self.siblings.get(&oid) {
                let stopped = matches!(worker.pid(), Err(BackgroundWorkerStatus::Stopped));
                if !stopped || started.elapsed() < RESTART_DELAY {
                    continue;
                }
            }
            if shared::relay_running(database, oid) {
                continue;
            }
            match launch_relay(database, oid) {
                Ok(worker) => {
                    self.siblings.insert(oid, (worker, Instant::now()));
                    self.said_no_worker = false;
                }
                Err(_) if !self.said_no_worker => {
                    warning!(
                        "broadcaster: cannot start the relay of backend \"{name}\" in \"{}\"; raise max_worker_processes",
                        self.database
                    );
                    self.said_no_worker = true;
                }
                Err(_) => {}
            }
        }
    }

    /// Takes the server's new definition: the backend is built again before the next claim.
    fn reconfigure(&mut self, now: ServerDefinition) {
        log!(
            "broadcaster: server \"{}\" of database \"{}\" changed; its backend is built again",
            now.name,
            self.database
        );
        self.definition = Some(now);
        self.sink = None;
        self.retry_at = None;
        self.outages = 0;
    }

    /// Builds the backend from the settings (default) or the server's definition, with
    /// Postgres's signals held: a thread the backend starts inherits that mask, so that the
    /// signals keep going to the relay's own thread, where Postgres handles them.
    fn build(&self) -> Result<Sink, BatchError> {
        let Some(definition) = &self.definition else {
            let _held = SignalsHeld::new();
            let kind = Kind::find(&guc::backend_name())?;
            let backend = kind.build(&guc::default_backend_options(&self.database))?;
            return Ok(Sink {
                backend,
                transactional: false,
            });
        };
        let mut options = Options::new(definition.options.iter().cloned())
            .with_context(guc::backend_context(&self.database, Some(&definition.name)));
        if definition.kind == function::KIND {
            let backend =
                BackgroundWorker::transaction(|| function::FunctionBackend::new(&options))?;
            return Ok(Sink {
                backend: Box::new(backend),
                transactional: true,
            });
        }
        let kind = Kind::find(&definition.kind)?;
        if kind.options.contains(&STREAM_PREFIX) {
            // Within the cluster's confinement: a server may narrow it, never widen it.
            let cluster = guc::stream_prefix();
            match options.get(STREAM_PREFIX) {
                None if !cluster.is_empty() => options.set(STREAM_PREFIX, cluster),
                Some(own) if !own.starts_with(&cluster) => {
                    return Err(BatchError::Misconfigured(format!(
                        "its stream_prefix {own:?} is outside broadcaster.stream_prefix {cluster:?}"
                    )))
                }
                _ => {}
            }
        }
        let _held = SignalsHeld::new();
        let backend = kind.build(&options)?;
        Ok(Sink {
            backend,
            transactional: false,
        })
    }

    /// Woken within [`COALESCE`] of the last small batch: lets a few more commits land first.
    fn coalesce(&self) {
        let Some(remaining) = self
            .last_small_batch
            .and_then(|t| COALESCE.checked_sub(t.elapsed()))
        else {
            return;
        };
        pg::sleep_micros(remaining.as_micros());
    }

    /// Zero when a full batch suggests more rows are waiting; otherwise until the backoff ends,
    /// the next look at the servers, or the safety-net poll, whichever is first. Commits wake
    /// the worker earlier.
    fn sleep_time(&self, more: bool) -> Duration {
        if more {
            return Duration::ZERO;
        }
        let poll = guc::poll_interval().min(SERVER_CHECK);
        match self.retry_at {
            Some(t) => t.saturating_duration_since(Instant::now()).min(poll),
            None => poll,
        }
    }

    fn tick(&mut self) -> Tick {
        if pg::read_only() {
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
            if self.server == 0 {
                let schema = &self.statements.schema;
                BackgroundWorker::transaction(|| {
                    housekeeping::check_origin(&self.database, schema)
                });
            }
            self.origin_checked = true;
        }
        if self.server != 0 && self.sink.is_none() {
            // About to build the backend: from the server as it is now (an ALTER SERVER may
            // have fixed what made the last build fail).
            let known = self.definition.as_ref();
            match BackgroundWorker::transaction(|| server_change(self.server, known)) {
                ServerChange::Gone => return Tick::ServerGone,
                ServerChange::Changed(now) => self.reconfigure(now),
                ServerChange::Same => {}
            }
        }
        let mut sink = match self.sink.take() {
            Some(sink) => sink,
            None => match self.build() {
                Ok(sink) => sink,
                Err(e) => return Tick::Outage(e),
            },
        };
        let statements = &self.statements;
        let (server, known) = (self.server, self.definition.as_ref());
        let mut changed = None;
        let tick = BackgroundWorker::transaction(AssertUnwindSafe(|| {
            // In the claim's own transaction: an event committed after an ALTER SERVER is
            // claimed with what it set, and none after a DROP SERVER.
            if server != 0 {
                match server_change(server, known) {
                    ServerChange::Gone => return Tick::ServerGone,
                    ServerChange::Changed(now) => {
                        changed = Some(now);
                        return Tick::Reconfigured;
                    }
                    ServerChange::Same => {}
                }
            }
            if sink.transactional {
                relay_in_transaction(statements, &mut *sink.backend)
            } else {
                relay_batch(statements, &mut *sink.backend)
            }
        }));
        match tick {
            Tick::Reconfigured => {
                if let Some(now) = changed {
                    self.reconfigure(now);
                }
                return Tick::Reconfigured;
            }
            Tick::ServerGone => return tick,
            _ => {
                let name = self.definition.as_ref().map(|d| d.name.as_str());
                note_warning(&mut self.warning, name, sink.backend.warning());
                self.sink = Some(sink);
            }
        }
        let retired = match tick {
            Tick::Published { retired, .. } => retired,
            _ => 0,
        };
        let caught_up = !matches!(tick, Tick::Published { full: true, .. });
        self.vacuum.after(retired, caught_up, statements.outbox);
        // Busy or idle: a relay that never idles must still forget them. None to forget while
        // none of its backend's is known (orphans of other backends are theirs to forget).
        let due = self
            .last_forget
            .is_none_or(|t| t.elapsed() >= housekeeping::FORGET_EVERY);
        if due && super::claim::failures_maybe() {
            BackgroundWorker::transaction(|| housekeeping::forget_orphan_failures(statements));
            self.last_forget = Some(Instant::now());
        }
        if let Some(definition) = &self.definition {
            // What broadcaster_health() needs to know of this backend, without a query.
            let pending = matches!(tick, Tick::Published { .. })
                || BackgroundWorker::transaction(|| {
                    Spi::get_one_with_args::<bool>(
                        &in_schema(PENDING, &statements.schema),
                        &[definition.name.as_str().into()],
                    )
                    .ok()
                    .flatten()
                    .unwrap_or(true)
                });
            shared::set_pending(pending);
        }
        if matches!(tick, Tick::Idle) {
            let due = self
                .last_purge
                .is_none_or(|t| t.elapsed() >= housekeeping::PURGE_EVERY);
            if self.server == 0 && due {
                BackgroundWorker::transaction(|| housekeeping::purge(statements));
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
        let Some(sink) = self.sink.as_mut() else {
            return Tick::Idle;
        };
        let checked = if sink.transactional {
            BackgroundWorker::transaction(AssertUnwindSafe(|| sink.backend.health_check()))
        } else {
            let _held = SignalsHeld::new();
            sink.backend.health_check()
        };
        let name = self.definition.as_ref().map(|d| d.name.as_str());
        note_warning(&mut self.warning, name, sink.backend.warning());
        match checked {
            Ok(()) => {
                self.last_contact = Some(Instant::now());
                shared::record_success(0);
                if self.outages > 0 {
                    log!(
                        "broadcaster: {}{} backend reachable again",
                        sink.backend.name(),
                        self.named()
                    );
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

    fn back_off(&mut self, error: &BatchError) {
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
        if matches!(error, BatchError::Misconfigured(_)) {
            self.sink = None;
        }
        let named = self.named_prefix();
        self.log_rate_limited(&format!(
            "broadcaster: {named}{error}; events stay pending, retrying in {} ms",
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

/// `backend "name": ` for a named backend's messages; empty for the default's (`name` None).
fn named_prefix(name: Option<&str>) -> String {
    match name {
        Some(name) => format!("backend \"{name}\": "),
        None => String::new(),
    }
}

/// Logs a backend's warning (of the backend `name`; None: the default) when it appears or
/// changes from `last`, and shows it in `broadcaster_status`.
fn note_warning(last: &mut Option<String>, name: Option<&str>, warning: Option<String>) {
    if warning == *last {
        return;
    }
    if let Some(text) = &warning {
        warning!("broadcaster: {}{text}", named_prefix(name));
    }
    shared::set_warning(warning.as_deref());
    *last = warning;
}
