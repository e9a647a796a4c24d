//! What the relay workers and every backend share: each relay's health and counters (read by
//! `broadcaster_health()` and `broadcaster_status()`), and its latch, which a committing
//! producer sets so the relay of its database works at once instead of at the next poll. One
//! slot per served database.
//!
//! Shared memory exists only when the library is in `shared_preload_libraries`; without it
//! every function here is a harmless no-op (and health is false).

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicUsize, Ordering};

use pgrx::{pg_guard, pg_shmem_init, pg_sys, PGRXSharedMemory, PgAtomic, PgLwLock};

/// Most databases one cluster's relays serve.
pub const MAX_RELAYS: usize = 16;
const ERROR_TEXT: usize = 256;

/// One relay's view of itself.
#[derive(Copy, Clone, Debug)]
pub struct RelayState {
    /// Process id of the running relay; 0 when none runs.
    pub pid: i32,
    /// Database the slot belongs to; 0 for a free slot.
    pub database: u32,
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
}

/// Length of the window the recent publish rate is measured over.
const RATE_WINDOW_US: i64 = 10_000_000;

impl Default for RelayState {
    fn default() -> Self {
        RelayState {
            pid: 0,
            database: 0,
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
        }
    }
}

impl RelayState {
    pub fn last_error(&self) -> Option<String> {
        (self.last_error_len > 0)
            .then(|| String::from_utf8_lossy(&self.last_error[..self.last_error_len]).into_owned())
    }

    /// Running, and its last contact with the broker succeeded less than `timeout_us` ago.
    pub fn healthy(&self, timeout_us: i64) -> bool {
        self.pid != 0
            && self.last_ok > 0
            && self.last_ok >= self.last_error_at
            && now() - self.last_ok <= timeout_us
    }
}

#[derive(Copy, Clone, Default)]
pub struct Relays([RelayState; MAX_RELAYS]);
unsafe impl PGRXSharedMemory for Relays {}

/// Where each database's relay can be woken: read on the commit path, so lock-free.
#[derive(Default)]
pub struct Latches([Latch; MAX_RELAYS]);
#[derive(Default)]
struct Latch {
    database: AtomicU32,
    /// PGPROC number of the relay; -1 when none runs.
    procno: AtomicI32,
    /// The relay is waiting out a broker outage: a commit need not wake it.
    backing_off: AtomicBool,
}
unsafe impl PGRXSharedMemory for Latches {}

static STATE: PgLwLock<Relays> = unsafe { PgLwLock::new(c"broadcaster_relays") };
static LATCHES: PgAtomic<Latches> = unsafe { PgAtomic::new(c"broadcaster_latches") };

/// Set in the postmaster's `_PG_init` and inherited by every process it forks.
static PRELOADED: AtomicBool = AtomicBool::new(false);
/// This relay process's slot.
static MY_SLOT: AtomicUsize = AtomicUsize::new(usize::MAX);
/// This backend's transaction wrote outbox rows: wake the relay when it commits.
static WAKE_AT_COMMIT: AtomicBool = AtomicBool::new(false);
static XACT_CALLBACK_REGISTERED: AtomicBool = AtomicBool::new(false);

/// Called from `_PG_init` while preloading.
pub fn init() {
    pg_shmem_init!(STATE);
    pg_shmem_init!(LATCHES);
    PRELOADED.store(true, Ordering::Relaxed);
}

pub fn available() -> bool {
    PRELOADED.load(Ordering::Relaxed)
}

/// Now, as a Postgres timestamp.
pub fn now() -> i64 {
    unsafe { pg_sys::GetCurrentTimestamp() }
}

/// Takes the slot of `database` (or a free one) for this relay process. False when all slots
/// serve other databases: the relay then works without health reports or commit wake-ups.
pub fn relay_started(database: pg_sys::Oid) -> bool {
    let db = database.to_u32();
    let (procno, pid) = unsafe { ((*pg_sys::MyProc).pgprocno, pg_sys::MyProcPid) };
    let mut relays = STATE.exclusive();
    let slot = relays
        .0
        .iter()
        .position(|s| s.database == db)
        .or_else(|| relays.0.iter().position(|s| s.database == 0));
    let Some(slot) = slot else {
        return false;
    };
    let before = relays.0[slot];
    let started_at = now();
    relays.0[slot] = RelayState {
        pid,
        database: db,
        started_at,
        // Counters carry over from this database's previous relay.
        published: if before.database == db {
            before.published
        } else {
            0
        },
        failed: if before.database == db {
            before.failed
        } else {
            0
        },
        ..Default::default()
    };
    relays.0[slot].rate_since = started_at;
    relays.0[slot].rate_base = relays.0[slot].published;
    let latch = &LATCHES.get().0[slot];
    latch.backing_off.store(false, Ordering::Release);
    latch.procno.store(procno, Ordering::Release);
    latch.database.store(db, Ordering::Release);
    MY_SLOT.store(slot, Ordering::Relaxed);
    true
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
        // Truncated on a character boundary.
        let mut end = error.len().min(ERROR_TEXT);
        while !error.is_char_boundary(end) {
            end -= 1;
        }
        s.last_error[..end].copy_from_slice(&error.as_bytes()[..end]);
        s.last_error_len = end;
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

/// The relay serving `database`, if one ever ran since the cluster started.
pub fn relay_of(database: pg_sys::Oid) -> Option<RelayState> {
    relays()
        .into_iter()
        .find(|s| s.database == database.to_u32())
}

/// Arranges for this database's relay to be woken when the current transaction commits. Cheap
/// enough for every row: one flag, and a callback registered once per backend.
pub fn wake_at_commit() {
    // The relay never needs waking by its own writes.
    if !available() || MY_SLOT.load(Ordering::Relaxed) != usize::MAX {
        return;
    }
    if !XACT_CALLBACK_REGISTERED.swap(true, Ordering::Relaxed) {
        unsafe { pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut()) };
    }
    WAKE_AT_COMMIT.store(true, Ordering::Relaxed);
}

/// Runs after the commit record is written, where an ERROR would become a PANIC: it only reads
/// atomics and sets a latch, none of which can fail.
#[pg_guard]
unsafe extern "C-unwind" fn on_xact_event(event: pg_sys::XactEvent::Type, _arg: *mut c_void) {
    match event {
        pg_sys::XactEvent::XACT_EVENT_COMMIT if WAKE_AT_COMMIT.swap(false, Ordering::Relaxed) => {
            wake_relay(unsafe { pg_sys::MyDatabaseId });
        }
        // A prepared transaction commits elsewhere; the relay's poll picks it up.
        pg_sys::XactEvent::XACT_EVENT_ABORT | pg_sys::XactEvent::XACT_EVENT_PREPARE => {
            WAKE_AT_COMMIT.store(false, Ordering::Relaxed);
        }
        _ => {}
    }
}

fn wake_relay(database: pg_sys::Oid) {
    let db = database.to_u32();
    let Some(latch) = LATCHES
        .get()
        .0
        .iter()
        .find(|l| l.database.load(Ordering::Acquire) == db)
    else {
        return;
    };
    if latch.backing_off.load(Ordering::Acquire) {
        return;
    }
    let Ok(index) = u32::try_from(latch.procno.load(Ordering::Acquire)) else {
        return;
    };
    unsafe {
        let global = pg_sys::ProcGlobal;
        if global.is_null() || index >= (*global).allProcCount {
            return;
        }
        // A stale number only wakes some other process once: latches tolerate spurious sets.
        let proc_ = (*global).allProcs.add(index as usize);
        pg_sys::SetLatch(&raw mut (*proc_).procLatch);
    }
}
