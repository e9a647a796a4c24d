//! What the relay worker and every backend share: the worker's health (read by
//! `broadcaster_health()`), and its latch, which a committing producer sets so the worker
//! relays at once instead of at the next poll.
//!
//! Shared memory exists only when the library is in `shared_preload_libraries`; without it
//! every function here is a harmless no-op (and health is false).

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use pgrx::{pg_guard, pg_shmem_init, pg_sys, PGRXSharedMemory, PgAtomic, PgLwLock};

/// The worker's view of itself, published for `broadcaster_health()`.
#[derive(Copy, Clone, Default, Debug)]
pub struct RelayState {
    /// Process id of the running worker; 0 when none runs.
    pub pid: i32,
    /// Database the worker serves.
    pub database: u32,
    /// Last successful publish or health check (Postgres timestamp, microseconds).
    pub last_ok: i64,
    /// Last failed publish or health check.
    pub last_error_at: i64,
    /// Events published and events that failed an attempt, since the worker started.
    pub published: u64,
    pub failed: u64,
}

unsafe impl PGRXSharedMemory for RelayState {}

static STATE: PgLwLock<RelayState> = unsafe { PgLwLock::new(c"broadcaster_relay_state") };
/// The worker's PGPROC number, -1 when no worker runs. Atomic so the commit path takes no lock.
static WORKER_PROCNO: PgAtomic<AtomicI32> = unsafe { PgAtomic::new(c"broadcaster_worker_procno") };

/// Set in the postmaster's `_PG_init` and inherited by every process it forks.
static PRELOADED: AtomicBool = AtomicBool::new(false);
/// This backend's transaction wrote outbox rows: wake the worker when it commits.
static WAKE_AT_COMMIT: AtomicBool = AtomicBool::new(false);
static XACT_CALLBACK_REGISTERED: AtomicBool = AtomicBool::new(false);

/// Called from `_PG_init` while preloading.
pub fn init() {
    pg_shmem_init!(STATE);
    pg_shmem_init!(WORKER_PROCNO = AtomicI32::new(-1));
    PRELOADED.store(true, Ordering::Relaxed);
}

pub fn available() -> bool {
    PRELOADED.load(Ordering::Relaxed)
}

/// Now, as a Postgres timestamp.
pub fn now() -> i64 {
    unsafe { pg_sys::GetCurrentTimestamp() }
}

pub fn worker_started(database: pg_sys::Oid) {
    let (procno, pid) = unsafe { ((*pg_sys::MyProc).pgprocno, pg_sys::MyProcPid) };
    *STATE.exclusive() = RelayState {
        pid,
        database: database.to_u32(),
        ..Default::default()
    };
    WORKER_PROCNO.get().store(procno, Ordering::Release);
}

pub fn worker_stopped() {
    WORKER_PROCNO.get().store(-1, Ordering::Release);
    STATE.exclusive().pid = 0;
}

pub fn record_success(published: usize) {
    let mut state = STATE.exclusive();
    state.last_ok = now();
    state.published += published as u64;
}

pub fn record_failure(failed: usize) {
    let mut state = STATE.exclusive();
    state.last_error_at = now();
    state.failed += failed as u64;
}

pub fn state() -> Option<RelayState> {
    available().then(|| *STATE.share())
}

/// True when a worker serves `database` and its last contact with the broker succeeded, less
/// than `timeout_us` ago. Reads shared memory only: never blocks, never raises.
pub fn healthy(database: pg_sys::Oid, timeout_us: i64) -> bool {
    let Some(s) = state() else { return false };
    s.pid != 0
        && s.database == database.to_u32()
        && s.last_ok > 0
        && s.last_ok >= s.last_error_at
        && now() - s.last_ok <= timeout_us
}

/// Arranges for the worker to be woken when the current transaction commits. Cheap enough for
/// every INSERT statement: one flag, and a callback registered once per backend.
pub fn wake_at_commit() {
    if !available() {
        return;
    }
    if !XACT_CALLBACK_REGISTERED.swap(true, Ordering::Relaxed) {
        unsafe { pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut()) };
    }
    WAKE_AT_COMMIT.store(true, Ordering::Relaxed);
}

/// Runs after the commit record is written, where an ERROR would become a PANIC: it only reads
/// an atomic and sets a latch, neither of which can fail.
#[pg_guard]
unsafe extern "C-unwind" fn on_xact_event(event: pg_sys::XactEvent::Type, _arg: *mut c_void) {
    match event {
        pg_sys::XactEvent::XACT_EVENT_COMMIT if WAKE_AT_COMMIT.swap(false, Ordering::Relaxed) => {
            wake_worker();
        }
        // A prepared transaction commits elsewhere; the worker's poll picks it up.
        pg_sys::XactEvent::XACT_EVENT_ABORT | pg_sys::XactEvent::XACT_EVENT_PREPARE => {
            WAKE_AT_COMMIT.store(false, Ordering::Relaxed);
        }
        _ => {}
    }
}

fn wake_worker() {
    let procno = WORKER_PROCNO.get().load(Ordering::Acquire);
    let Ok(index) = u32::try_from(procno) else {
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
