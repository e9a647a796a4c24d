//! What the relay workers and every backend share: each relay's health and counters (read by
//! `broadcaster_health()` and `broadcaster_status()`), and its latch, which a committing
//! producer sets so the relays of its database work at once instead of at the next poll. One
//! slot per served database and backend: the default backend's relay, and one relay per
//! server of the `broadcaster` foreign-data wrapper.
//!
//! It also carries what the launcher must hear about from other processes: a database whose
//! relay found no extension (and a `CREATE EXTENSION` that ended that), and databases a backend
//! needs left alone while it drops, renames or copies them.
//!
//! Shared memory exists only when the library is in `shared_preload_libraries`; without it
//! every function here is a harmless no-op (and health is false).

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicUsize, Ordering};

use pgrx::{pg_guard, pg_shmem_init, pg_sys, PGRXSharedMemory, PgAtomic, PgLwLock};

/// Most databases one cluster's relays serve.
pub const MAX_DATABASES: usize = 16;
/// Most relays with a slot: the default backend's of each database, and one per named backend
/// (server). A relay without a slot still relays, without health reports or commit wake-ups.
pub const MAX_RELAYS: usize = 64;
/// Longest backend (server) name kept: PostgreSQL's NAMEDATALEN - 1.
const NAME_TEXT: usize = 63;
/// Most `DROP`/`RENAME`/`CREATE DATABASE ... TEMPLATE` commands stepping a relay aside at once.
const MAX_ASIDE: usize = 8;
const ERROR_TEXT: usize = 256;

/// One relay's view of itself.
#[derive(Copy, Clone, Debug)]
pub struct RelayState {
    /// Process id of the running relay; 0 when none runs.
    pub pid: i32,
    /// Database the slot belongs to; 0 for a free slot.
    pub database: u32,
    /// The foreign server (named backend) relayed to; 0 for the default backend.
    pub server: u32,
    backend: [u8; NAME_TEXT],
    backend_len: usize,
    /// The backend's kind (`redis`, `file`, `function`).
    kind: [u8; NAME_TEXT],
    kind_len: usize,
    /// Last successful publish or broker check (Postgres timestamp, microseconds).
    pub last_ok: i64,
    /// Last failed publish or broker check, and what failed.
    pub last_error_at: i64,
    last_error: [u8; ERROR_TEXT],
    last_error_len: usize,
    /// Events published, and failed attempts, since the cluster started (they survive a relay's
    /// restart, not the cluster's).
    pub published: u64,
    pub failed: u64,
    /// When the relay started.
    pub started_at: i64,
    /// `published` as it was at `rate_since`: the recent rate is measured from there.
    rate_since: i64,
    rate_base: u64,
    /// Events per second over the last completed window of `RATE_WINDOW_US`.
    pub recent_rate: f64,
    /// The relay runs but waits: its database is read-only.
    pub read_only: bool,
    /// A named backend's relay: its backend has events in the outbox. The default backend's:
    /// the outbox holds events naming a backend that has no server.
    pub pending: bool,
    /// What the backend last found wrong with its broker that is not an outage
    /// ([`crate::backend::PublisherBackend::warning`]).
    warning: [u8; ERROR_TEXT],
    warning_len: usize,
}

/// Length of the window the recent publish rate is measured over.
const RATE_WINDOW_US: i64 = 10_000_000;

impl Default for RelayState {
    fn default() -> Self {
        RelayState {
            pid: 0,
            database: 0,
            server: 0,
            backend: [0; NAME_TEXT],
            backend_len: 0,
            kind: [0; NAME_TEXT],
            kind_len: 0,
            last_ok: 0,
            last_error_at: 0,
            last_error: [0; ERROR_TEXT],
            last_error_len: 0,
            published: 0,
            failed: 0,
            started_at: 0,
            rate_since: 0,
            rate_base: 0,
            recent_rate: 0.0,
            read_only: false,
            pending: false,
            warning: [0; ERROR_TEXT],
            warning_len: 0,
        }
    }
}

impl RelayState {
    /// No relay's state yet: what a hot standby reports for a database it will serve once
    /// promoted.
    pub fn of(database: pg_sys::Oid) -> RelayState {
        RelayState {
            database: database.to_u32(),
            ..Default::default()
        }
    }

    /// The server's name; None for the default backend.
    pub fn backend(&self) -> Option<String> {
        (self.server != 0)
            .then(|| String::from_utf8_lossy(&self.backend[..self.backend_len]).into_owned())
    }

    /// The backend's kind, as last started; None before.
    pub fn kind(&self) -> Option<String> {
        (self.kind_len > 0)
            .then(|| String::from_utf8_lossy(&self.kind[..self.kind_len]).into_owned())
    }

    pub fn last_error(&self) -> Option<String> {
        (self.last_error_len > 0)
            .then(|| String::from_utf8_lossy(&self.last_error[..self.last_error_len]).into_owned())
    }

    pub fn warning(&self) -> Option<String> {
        (self.warning_len > 0)
            .then(|| String::from_utf8_lossy(&self.warning[..self.warning_len]).into_owned())
    }

    /// Running, and its last contact with the broker succeeded less than `timeout_us` ago.
    pub fn healthy(&self, timeout_us: i64) -> bool {
        self.pid != 0
            && !self.read_only
            && self.last_ok > 0
            && self.last_ok >= self.last_error_at
            && now() - self.last_ok <= timeout_us
    }
}

#[derive(Copy, Clone)]
pub struct Relays([RelayState; MAX_RELAYS]);

impl Default for Relays {
    fn default() -> Self {
        Relays([RelayState::default(); MAX_RELAYS])
    }
}
unsafe impl PGRXSharedMemory for Relays {}

/// Where each database's relay can be woken: read on the commit path, so lock-free.
pub struct Latches([Latch; MAX_RELAYS]);

impl Default for Latches {
    fn default() -> Self {
        Latches(std::array::from_fn(|_| Latch::default()))
    }
}
#[derive(Default)]
struct Latch {
    database: AtomicU32,
    /// PGPROC number of the relay; -1 when none runs.
    procno: AtomicI32,
    /// The relay is waiting out a broker outage: a commit need not wake it.
    backing_off: AtomicBool,
    /// The relay serves a named backend.
    named: AtomicBool,
    /// A backend asks the relay to leave its database (see [`step_aside`]).
    leave: AtomicBool,
}

/// What the launcher hears from other processes, lock-free: commit callbacks write here.
#[derive(Default)]
pub struct LauncherMail {
    /// PGPROC number of the launcher plus one; 0 when none runs (shared memory starts zeroed).
    launcher: AtomicI32,
    /// Databases whose relay found the extension missing, until a `CREATE EXTENSION` commits
    /// there.
    absent: [AtomicU32; MAX_DATABASES],
    /// Databases whose relay left for that reason, until the launcher has seen it stop.
    probed: [AtomicU32; MAX_DATABASES],
    /// Databases a backend is dropping, renaming or copying: (database, that backend's pid).
    aside: [(AtomicU32, AtomicI32); MAX_ASIDE],
}
unsafe impl PGRXSharedMemory for Latches {}
unsafe impl PGRXSharedMemory for LauncherMail {}

static STATE: PgLwLock<Relays> = unsafe { PgLwLock::new(c"broadcaster_relays") };
static LATCHES: PgAtomic<Latches> = unsafe { PgAtomic::new(c"broadcaster_latches") };
static MAIL: PgAtomic<LauncherMail> = unsafe { PgAtomic::new(c"broadcaster_launcher_mail") };

/// Set in the postmaster's `_PG_init` and inherited by every process it forks.
static PRELOADED: AtomicBool = AtomicBool::new(false);
/// This relay process's slot.
static MY_SLOT: AtomicUsize = AtomicUsize::new(usize::MAX);
/// This backend's transaction wrote outbox rows: wake the relays when it commits. Bit 1: for
/// the default backend; bit 2: for a named one ([`WAKE_DEFAULT`], [`WAKE_NAMED`]).
static WAKE_AT_COMMIT: AtomicU32 = AtomicU32::new(0);
const WAKE_DEFAULT: u32 = 1;
const WAKE_NAMED: u32 = 2;
/// This backend's transaction created the extension: tell the launcher when it commits.
static INSTALLED_AT_COMMIT: AtomicBool = AtomicBool::new(false);
static XACT_CALLBACK_REGISTERED: AtomicBool = AtomicBool::new(false);

/// Called from `_PG_init` while preloading.
pub fn init() {
    pg_shmem_init!(STATE);
    pg_shmem_init!(LATCHES);
    pg_shmem_init!(MAIL);
    PRELOADED.store(true, Ordering::Relaxed);
}

pub fn available() -> bool {
    PRELOADED.load(Ordering::Relaxed)
}

/// Now, as a Postgres timestamp.
pub fn now() -> i64 {
    crate::pg::now()
}

/// What [`relay_started`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Started {
    /// This process has the slot of its database and backend.
    Slot,
    /// Every slot serves another database or backend: relayed without health reports or
    /// commit wake-ups.
    NoSlot,
    /// Another live process already relays this database and backend.
    AlreadyServed(i32),
}

/// Takes the slot of `database` and `server` (0: the default backend), or a free one, for this
/// relay process, naming its backend and kind.
pub fn relay_started(database: pg_sys::Oid, server: u32, backend: &str, kind: &str) -> Started {
    let db = database.to_u32();
    let (procno, pid) = (crate::pg::my_procno(), crate::pg::my_pid());
    let mut relays = STATE.exclusive();
    let mine = |s: &RelayState| s.database == db && s.server == server;
    if let Some(other) = relays
        .0
        .iter()
        .find(|s| mine(s) && s.pid != 0 && s.pid != pid)
    {
        if crate::pg::process_alive(other.pid) {
            return Started::AlreadyServed(other.pid);
        }
    }
    // Its own slot, else a free one, else one whose relay stopped (its database dropped, its
    // server dropped, or no longer served; its counters go).
    let slot = relays
        .0
        .iter()
        .position(mine)
        .or_else(|| relays.0.iter().position(|s| s.database == 0))
        .or_else(|| relays.0.iter().position(|s| s.pid == 0));
    let Some(slot) = slot else {
        return Started::NoSlot;
    };
    let before = relays.0[slot];
    let same = mine(&before);
    let started_at = now();
    let mut state = RelayState {
        pid,
        database: db,
        server,
        started_at,
        // Counters carry over from this database's and backend's previous relay.
        published: if same { before.published } else { 0 },
        failed: if same { before.failed } else { 0 },
        ..Default::default()
    };
    state.backend_len = copy_text(&mut state.backend, backend);
    state.kind_len = copy_text(&mut state.kind, kind);
    state.rate_since = started_at;
    state.rate_base = state.published;
    relays.0[slot] = state;
    let latch = &LATCHES.get().0[slot];
    latch.backing_off.store(false, Ordering::Release);
    // A command that asked while this relay was starting still wants it gone.
    latch.leave.store(is_aside(database), Ordering::Release);
    latch.named.store(server != 0, Ordering::Release);
    latch.procno.store(procno, Ordering::Release);
    latch.database.store(db, Ordering::Release);
    MY_SLOT.store(slot, Ordering::Relaxed);
    Started::Slot
}

/// Copies `text` into `buffer`, cut on a character boundary; returns the length kept.
fn copy_text(buffer: &mut [u8], text: &str) -> usize {
    let mut end = text.len().min(buffer.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    buffer[..end].copy_from_slice(&text.as_bytes()[..end]);
    end
}

/// The relay of `database` and `server` (0: the default backend) is running.
pub fn relay_running(database: pg_sys::Oid, server: u32) -> bool {
    relays().iter().any(|s| {
        s.database == database.to_u32() && s.server == server && crate::pg::process_alive(s.pid)
    })
}

fn with_my_slot(f: impl FnOnce(&mut RelayState)) {
    let slot = MY_SLOT.load(Ordering::Relaxed);
    if slot < MAX_RELAYS {
        f(&mut STATE.exclusive().0[slot]);
    }
}

/// While true, committing producers leave this relay asleep: it is waiting out an outage and
/// claims what they committed when its retry is due.
pub fn set_backing_off(backing_off: bool) {
    let slot = MY_SLOT.load(Ordering::Relaxed);
    if slot < MAX_RELAYS {
        LATCHES.get().0[slot]
            .backing_off
            .store(backing_off, Ordering::Release);
    }
}

pub fn relay_stopped() {
    let slot = MY_SLOT.load(Ordering::Relaxed);
    if slot < MAX_RELAYS {
        LATCHES.get().0[slot].procno.store(-1, Ordering::Release);
    }
    with_my_slot(|s| s.pid = 0);
}

pub fn record_success(published: usize) {
    with_my_slot(|s| {
        let now = now();
        s.last_ok = now;
        s.published += published as u64;
        let elapsed = now - s.rate_since;
        if elapsed >= RATE_WINDOW_US {
            s.recent_rate = (s.published - s.rate_base) as f64 * 1e6 / elapsed as f64;
            s.rate_since = now;
            s.rate_base = s.published;
        }
    });
}

pub fn record_failure(failed: usize, error: &str) {
    with_my_slot(|s| {
        s.last_error_at = now();
        s.failed += failed as u64;
        s.last_error_len = copy_text(&mut s.last_error, error);
    });
}

/// Every slot in use.
pub fn relays() -> Vec<RelayState> {
    if !available() {
        return Vec::new();
    }
    STATE
        .share()
        .0
        .iter()
        .filter(|s| s.database != 0)
        .copied()
        .collect()
}

/// Every relay of `database` that ran since the cluster started, the default backend's first.
pub fn relays_of(database: pg_sys::Oid) -> Vec<RelayState> {
    let mut relays: Vec<RelayState> = relays()
        .into_iter()
        .filter(|s| s.database == database.to_u32())
        .collect();
    relays.sort_by_key(|s| s.server != 0);
    relays
}

/// Arranges for this database's relays to be woken when the current transaction commits: the
/// default backend's, or (`named`) those of named backends. Cheap enough for every row: one
/// flag, and a callback registered once per backend.
pub fn wake_at_commit(named: bool) {
    // The relay never needs waking by its own writes.
    if !available() || MY_SLOT.load(Ordering::Relaxed) != usize::MAX {
        return;
    }
    register_xact_callback();
    WAKE_AT_COMMIT.fetch_or(
        if named { WAKE_NAMED } else { WAKE_DEFAULT },
        Ordering::Relaxed,
    );
}

/// Arranges for the launcher to hear, when the current transaction commits, that the extension
/// now exists in this database: its relay then starts at once, not at the next re-check.
pub fn installed_at_commit() {
    if !available() {
        return;
    }
    register_xact_callback();
    INSTALLED_AT_COMMIT.store(true, Ordering::Relaxed);
}

fn register_xact_callback() {
    if !XACT_CALLBACK_REGISTERED.swap(true, Ordering::Relaxed) {
        crate::pg::register_xact_callback(on_xact_event);
    }
}

/// Runs after the commit record is written, where an ERROR would become a PANIC: it only reads
/// and writes atomics and sets latches, none of which can fail.
#[pg_guard]
unsafe extern "C-unwind" fn on_xact_event(event: pg_sys::XactEvent::Type, _arg: *mut c_void) {
    match event {
        pg_sys::XactEvent::XACT_EVENT_COMMIT => {
            let database = crate::pg::my_database().to_u32();
            let wake = WAKE_AT_COMMIT.swap(0, Ordering::Relaxed);
            if wake != 0 {
                wake_relay(database, wake);
            }
            release_asides();
            if INSTALLED_AT_COMMIT.swap(false, Ordering::Relaxed) {
                let mail = MAIL.get();
                for absent in &mail.absent {
                    let _ =
                        absent.compare_exchange(database, 0, Ordering::AcqRel, Ordering::Relaxed);
                }
                wake_launcher(mail);
            }
        }
        // A prepared transaction commits elsewhere; the relay's poll picks it up.
        pg_sys::XactEvent::XACT_EVENT_ABORT | pg_sys::XactEvent::XACT_EVENT_PREPARE => {
            WAKE_AT_COMMIT.store(0, Ordering::Relaxed);
            INSTALLED_AT_COMMIT.store(false, Ordering::Relaxed);
            release_asides();
        }
        _ => {}
    }
}

/// Wakes the relays of `db` that `wake` asks for: the default backend's, named backends'.
fn wake_relay(db: u32, wake: u32) {
    for latch in &LATCHES.get().0 {
        let wanted = if latch.named.load(Ordering::Acquire) {
            WAKE_NAMED
        } else {
            WAKE_DEFAULT
        };
        if latch.database.load(Ordering::Acquire) == db
            && wake & wanted != 0
            && !latch.backing_off.load(Ordering::Acquire)
        {
            crate::pg::set_latch(latch.procno.load(Ordering::Acquire));
        }
    }
}

fn wake_launcher(mail: &LauncherMail) {
    crate::pg::set_latch(mail.launcher.load(Ordering::Acquire) - 1);
}

/// The relay's database is read-only (or writable again): `broadcaster_status` says so, and
/// health is false meanwhile.
/// See [`RelayState::pending`].
pub fn set_pending(pending: bool) {
    with_my_slot(|s| s.pending = pending);
}

/// What the backend finds wrong with its broker now; None clears it.
pub fn set_warning(warning: Option<&str>) {
    with_my_slot(|s| s.warning_len = copy_text(&mut s.warning, warning.unwrap_or("")));
}

pub fn set_read_only(read_only: bool) {
    with_my_slot(|s| s.read_only = read_only);
}

/// A backend asked this relay to leave its database ([`step_aside`]).
pub fn asked_to_leave() -> bool {
    let slot = MY_SLOT.load(Ordering::Relaxed);
    slot < MAX_RELAYS && LATCHES.get().0[slot].leave.load(Ordering::Acquire)
}

/// The launcher is running in this process: others may wake it.
pub fn launcher_started() {
    if available() {
        MAIL.get()
            .launcher
            .store(crate::pg::my_procno() + 1, Ordering::Release);
    }
}

pub fn launcher_stopped() {
    if available() {
        MAIL.get().launcher.store(0, Ordering::Release);
    }
}

/// The relay of `database` found no extension there and leaves; the launcher waits for a
/// `CREATE EXTENSION` (or its next re-check) before it connects again.
pub fn note_extension_absent(database: pg_sys::Oid) {
    if available() {
        let mail = MAIL.get();
        add(&mail.absent, database);
        add(&mail.probed, database);
    }
}

/// Whether `database`'s relay found no extension, and no `CREATE EXTENSION` has committed there
/// since. `forget`: the launcher is about to look again, so the note goes.
pub fn extension_absent(database: pg_sys::Oid, forget: bool) -> bool {
    if !available() {
        return false;
    }
    let absent = &MAIL.get().absent;
    if forget {
        remove(absent, database)
    } else {
        absent
            .iter()
            .any(|a| a.load(Ordering::Acquire) == database.to_u32())
    }
}

/// Whether the relay of `database` that stopped last left because it found no extension (not
/// an error): it is started again without the delay after a crash. Taken once.
pub fn take_probe(database: pg_sys::Oid) -> bool {
    available() && remove(&MAIL.get().probed, database)
}

/// Adds `database` to a set of oids (0: a free place); nothing when it is there already, or full.
fn add(set: &[AtomicU32], database: pg_sys::Oid) {
    let db = database.to_u32();
    if set.iter().any(|a| a.load(Ordering::Acquire) == db) {
        return;
    }
    for a in set {
        if a.compare_exchange(0, db, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            return;
        }
    }
}

/// Removes `database` from a set of oids; whether it was there.
fn remove(set: &[AtomicU32], database: pg_sys::Oid) -> bool {
    let db = database.to_u32();
    set.iter().any(|a| {
        a.compare_exchange(db, 0, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    })
}

/// The marks ([`step_aside`]) this backend holds, one bit per place in `LauncherMail::aside`.
static MY_ASIDE: AtomicU32 = AtomicU32::new(0);
static ASIDE_EXIT_REGISTERED: AtomicBool = AtomicBool::new(false);

/// Asks the relay of `database` to leave it, and the launcher to start none there, until this
/// backend's transaction ends (committed or not) or the backend exits: PostgreSQL refuses to
/// drop, rename or copy a database another process is connected to (after waiting 5 s for it
/// to leave), and a RENAME in a transaction block is not done before its COMMIT. Nothing when
/// shared memory is unavailable or every mark is taken (the command then meets the relay).
pub fn step_aside(database: pg_sys::Oid) {
    if !available() {
        return;
    }
    let db = database.to_u32();
    let mail = MAIL.get();
    let me = crate::pg::my_pid();
    let Some(slot) = mail.aside.iter().position(|(d, pid)| {
        let taken = d
            .compare_exchange(0, db, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok();
        if taken {
            pid.store(me, Ordering::Release);
        }
        taken
    }) else {
        return;
    };
    MY_ASIDE.fetch_or(1 << slot, Ordering::AcqRel);
    register_xact_callback();
    if !ASIDE_EXIT_REGISTERED.swap(true, Ordering::Relaxed) {
        crate::pg::before_exit(release_at_exit);
    }
    for latch in &LATCHES.get().0 {
        if latch.database.load(Ordering::Acquire) == db {
            latch.leave.store(true, Ordering::Release);
            crate::pg::set_latch(latch.procno.load(Ordering::Acquire));
        }
    }
}

/// Gives back this backend's marks and wakes the launcher, which serves the databases again if
/// they are still to be served. Atomics and a latch only: it runs in the commit callback.
fn release_asides() {
    let mine = MY_ASIDE.swap(0, Ordering::AcqRel);
    if mine == 0 {
        return;
    }
    let mail = MAIL.get();
    for (slot, (database, pid)) in mail.aside.iter().enumerate() {
        if mine & (1 << slot) != 0 {
            pid.store(0, Ordering::Release);
            database.store(0, Ordering::Release);
        }
    }
    wake_launcher(mail);
}

#[pg_guard]
unsafe extern "C-unwind" fn release_at_exit(_code: std::ffi::c_int, _arg: pg_sys::Datum) {
    release_asides();
}

/// Whether a backend has `database` stepped aside ([`step_aside`]) and is still running. The
/// mark of a holder gone without giving it back (killed) is cleared here.
pub fn is_aside(database: pg_sys::Oid) -> bool {
    if !available() {
        return false;
    }
    let db = database.to_u32();
    MAIL.get().aside.iter().any(|(d, pid)| {
        if d.load(Ordering::Acquire) != db {
            return false;
        }
        let holder = pid.load(Ordering::Acquire);
        // 0: being taken right now.
        if holder == 0 || crate::pg::process_alive(holder) {
            return true;
        }
        if pid
            .compare_exchange(holder, 0, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            let _ = d.compare_exchange(db, 0, Ordering::AcqRel, Ordering::Relaxed);
        }
        false
    })
}
