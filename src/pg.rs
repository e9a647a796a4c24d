//! Raw PostgreSQL calls, each behind a safe function: signal masks around network calls,
//! internal subtransactions, catalog lookups (with and without a database), VACUUM, reading
//! SPI results in place, latches and callbacks, and who the session is. Elsewhere `pg_sys` is
//! called only where the code is PostgreSQL's own interface: the hooks (`hooks.rs`), the
//! `broadcaster_publish` C function and its datums (`api.rs`), and shared memory's
//! declarations (`shared.rs`).

use pgrx::pg_sys::AsPgCStr;
use pgrx::prelude::*;
use pgrx::PgMemoryContexts;

/// Postgres's signals held (blocked) in this thread while this lives, released (delivered) when
/// it drops, an unwinding ERROR included. Around the backend's network calls: a signal handled
/// during a socket read or write that has a timeout makes it fail with EINTR whatever
/// SA_RESTART says (signal(7)), and every `DROP DATABASE` (a ProcSignalBarrier), reload or
/// commit wake-up sends one; read as an outage, that would send the whole batch again. Held,
/// they wait at most the backend's network timeout. A thread started meanwhile inherits the
/// mask, so that signals keep going to the relay's own thread, where Postgres handles them.
pub struct SignalsHeld;

impl SignalsHeld {
    pub fn new() -> SignalsHeld {
        unsafe { pg_sys::BackgroundWorkerBlockSignals() };
        SignalsHeld
    }
}

impl Drop for SignalsHeld {
    fn drop(&mut self) {
        unsafe { pg_sys::BackgroundWorkerUnblockSignals() };
    }
}

/// An internal subtransaction of the current transaction, as procedural languages open them
/// around a block that may be undone. Ends when committed or rolled back; dropped without
/// either (an unwinding ERROR), the enclosing transaction's abort undoes it.
pub struct SubTransaction {
    context: pg_sys::MemoryContext,
    owner: pg_sys::ResourceOwner,
}

impl SubTransaction {
    pub fn begin() -> Self {
        unsafe {
            let context = pg_sys::CurrentMemoryContext;
            let owner = pg_sys::CurrentResourceOwner;
            pg_sys::BeginInternalSubTransaction(std::ptr::null());
            pg_sys::MemoryContextSwitchTo(context);
            SubTransaction { context, owner }
        }
    }

    pub fn commit(self) {
        unsafe {
            pg_sys::ReleaseCurrentSubTransaction();
            self.restore();
        }
    }

    pub fn roll_back(self) {
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

/// Runs `f` in a subtransaction: kept when it returns `Ok`; undone when it returns `Err` or
/// raises an ERROR, whose message then comes back as `Err`, the enclosing transaction usable.
pub fn in_subtransaction<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    let subxact = std::cell::Cell::new(Some(SubTransaction::begin()));
    let in_try = std::panic::AssertUnwindSafe(&subxact);
    let in_catch = std::panic::AssertUnwindSafe(&subxact);
    let f = std::panic::AssertUnwindSafe(f);
    PgTryBuilder::new(move || {
        // The whole wrappers, not their fields: a closure captures only the fields it uses.
        let (f, in_try) = (f, in_try);
        let result = (f.0)();
        if let Some(s) = in_try.take() {
            match result {
                Ok(_) => s.commit(),
                Err(_) => s.roll_back(),
            }
        }
        result
    })
    .catch_others(move |caught| {
        let in_catch = &in_catch;
        if let Some(s) = in_catch.take() {
            s.roll_back();
        }
        Err(match caught {
            pg_sys::panic::CaughtError::PostgresError(report)
            | pg_sys::panic::CaughtError::ErrorReport(report)
            | pg_sys::panic::CaughtError::RustPanic {
                ereport: report, ..
            } => report.message().to_string(),
        })
    })
    .execute()
}

/// What pg_database says of a database the launcher is to serve.
pub enum Database {
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
/// Inside a transaction.
pub fn find_database(name: &str) -> Database {
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

/// The name of the database this process is connected to; empty if it is gone. Inside a
/// transaction.
pub fn my_database_name() -> String {
    unsafe {
        let name = pg_sys::get_database_name(pg_sys::MyDatabaseId);
        if name.is_null() {
            String::new()
        } else {
            std::ffi::CStr::from_ptr(name)
                .to_string_lossy()
                .into_owned()
        }
    }
}

/// The database this process is connected to.
pub fn my_database() -> pg_sys::Oid {
    unsafe { pg_sys::MyDatabaseId }
}

/// This process's pid.
pub fn my_pid() -> i32 {
    unsafe { pg_sys::MyProcPid }
}

/// Whether the session is read-only (`default_transaction_read_only`).
pub fn read_only() -> bool {
    unsafe { pg_sys::DefaultXactReadOnly }
}

/// Re-reads the configuration files after a SIGHUP.
pub fn reload_configuration() {
    unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
}

/// Sleeps `micros` microseconds.
pub fn sleep_micros(micros: u128) {
    let micros = std::ffi::c_long::try_from(micros).unwrap_or(0);
    unsafe { pg_sys::pg_usleep(micros) };
}

/// Ends this worker process with `code`: 1 has the postmaster start it again after its restart
/// time (unless the server is shutting down), 0 has it forgotten.
// PostgreSQL 15's bindings say proc_exit never returns, 18's do not.
#[allow(unreachable_code)]
pub fn exit(code: i32) -> ! {
    unsafe { pg_sys::proc_exit(code) };
    unreachable!("proc_exit does not return")
}

/// Calls `on_exit` however this process ends, an ERROR included.
pub fn before_exit(on_exit: unsafe extern "C-unwind" fn(std::ffi::c_int, pg_sys::Datum)) {
    unsafe { pg_sys::before_shmem_exit(Some(on_exit), pg_sys::Datum::from(0usize)) };
}

/// `VACUUM (SKIP_LOCKED, TRUNCATE false)` of `table`, run between transactions as a session
/// would run it: VACUUM commits its own transactions. Skipped while autovacuum holds the table;
/// never truncates, which would lock out producers.
pub fn vacuum(table: pg_sys::Oid) {
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
                pg_sys::makeVacuumRelation(std::ptr::null_mut(), table, std::ptr::null_mut());
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
    // VACUUM waits on this process's latch where it must (a buffer another backend pins, for
    // an index page's cleanup lock) and resets it afterwards, swallowing any commit's wake-up
    // that came meanwhile: the caller's next wait would sleep the whole poll interval with
    // events waiting (measured: the last events of a burst 1 s late). Set again, so that the
    // caller looks at the outbox once more before it sleeps.
    set_latch(my_procno());
}

/// The characters of a text datum. Bytes that are not UTF-8 (a database in another encoding)
/// are replaced, never trusted.
///
/// # Safety
/// `datum` must be a non-null text (or other varlena) datum.
pub unsafe fn text_datum(datum: pg_sys::Datum) -> String {
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

/// One row of an SPI result, deformed once, its columns read in place.
pub struct Row<'a> {
    values: &'a [pg_sys::Datum],
    nulls: &'a [bool],
    /// Each column's type, as the result has it.
    types: &'a [pg_sys::Oid],
}

impl Row<'_> {
    fn value(&self, column: usize) -> Option<pg_sys::Datum> {
        match self.nulls.get(column) {
            Some(false) => self.values.get(column).copied(),
            _ => None,
        }
    }

    pub fn is_null(&self, column: usize) -> bool {
        self.value(column).is_none()
    }

    /// A text, varchar or json column; None when NULL or of another type.
    pub fn text(&self, column: usize) -> Option<String> {
        let textual = matches!(
            self.types.get(column).copied(),
            Some(pg_sys::TEXTOID | pg_sys::VARCHAROID | pg_sys::JSONOID)
        );
        // SAFETY: a datum of these types is a varlena.
        self.value(column)
            .filter(|_| textual)
            .map(|d| unsafe { text_datum(d) })
    }

    /// An int8, int4 or timestamptz column (passed by value); 0 when NULL.
    pub fn int(&self, column: usize) -> i64 {
        self.value(column).map_or(0, |d| d.value() as i64)
    }

    /// A uuid column's 16 bytes; None when NULL or of another type.
    pub fn uuid(&self, column: usize) -> Option<[u8; 16]> {
        let uuid = self.types.get(column) == Some(&pg_sys::UUIDOID);
        // SAFETY: a uuid datum points to its 16 bytes.
        self.value(column)
            .filter(|_| uuid)
            .map(|d| unsafe { *d.cast_mut_ptr::<[u8; 16]>() })
    }
}

/// Reads every row of the last SPI result (`SPI_tuptable`) with `f`, when it has exactly
/// `types.len()` columns and column `i` has type `types[i]` (`InvalidOid`: any by-value or
/// text type, as `f` reads it). Call it inside the `Spi::connect` that ran the statement: the
/// rows live until that ends. Returns the number of rows, or None when the shape differs.
pub fn read_spi_rows(types: &[pg_sys::Oid], mut f: impl FnMut(Row<'_>)) -> Option<usize> {
    let table = unsafe { pg_sys::SPI_tuptable };
    if table.is_null() {
        return Some(0);
    }
    // SAFETY: SPI_tuptable is the current result, valid until SPI_finish.
    let (tupdesc, n) = unsafe { ((*table).tupdesc, (*table).numvals) };
    // Through pgrx's accessor: PostgreSQL 18 reaches a tuple descriptor's attributes by a
    // function (TupleDescAttr), not the `attrs` array of earlier versions.
    let columns = unsafe { pgrx::PgTupleDesc::from_pg_unchecked(tupdesc) };
    let type_of = |c: usize| columns.get(c).map_or(pg_sys::InvalidOid, |a| a.atttypid);
    let shaped = columns.len() == types.len()
        && types
            .iter()
            .enumerate()
            .all(|(c, &t)| t == pg_sys::InvalidOid || type_of(c) == t);
    if !shaped {
        return None;
    }
    let actual: Vec<pg_sys::Oid> = (0..types.len()).map(type_of).collect();
    let mut values = vec![pg_sys::Datum::from(0usize); types.len()];
    let mut nulls = vec![true; types.len()];
    let n = usize::try_from(n).unwrap_or(0);
    for i in 0..n {
        // SAFETY: `i` is below numvals; the arrays have one entry per column.
        unsafe {
            pg_sys::heap_deform_tuple(
                *(*table).vals.add(i),
                tupdesc,
                values.as_mut_ptr(),
                nulls.as_mut_ptr(),
            );
        }
        f(Row {
            values: &values,
            nulls: &nulls,
            types: &actual,
        });
    }
    Some(n)
}

/// Now, as a PostgreSQL timestamp (microseconds since 2000-01-01 UTC).
pub fn now() -> i64 {
    unsafe { pg_sys::GetCurrentTimestamp() }
}

/// Whether a process with this pid is a live backend or worker of this cluster.
pub fn process_alive(pid: i32) -> bool {
    pid != 0 && !unsafe { pg_sys::BackendPidGetProc(pid) }.is_null()
}

/// Whether the current role is a superuser.
pub fn superuser() -> bool {
    unsafe { pg_sys::superuser() }
}

/// The cluster's system identifier (`pg_control_system()`'s `system_identifier`): the same
/// on its physical standbys, new after `initdb` (and so after `pg_upgrade`).
pub fn system_identifier() -> u64 {
    unsafe { pg_sys::GetSystemIdentifier() }
}

/// Whether this server is a standby (in recovery).
pub fn in_recovery() -> bool {
    unsafe { pg_sys::RecoveryInProgress() }
}

/// The oid of the database named `name`, if there is one.
pub fn database_oid(name: &str) -> Option<pg_sys::Oid> {
    let name = std::ffi::CString::new(name).ok()?;
    let oid = unsafe { pg_sys::get_database_oid(name.as_ptr(), true) };
    (oid != pg_sys::InvalidOid).then_some(oid)
}

/// Whether `session_replication_role` is `replica` (a superuser loading data, or a logical
/// replication worker).
pub fn replication_role_replica() -> bool {
    unsafe { pg_sys::SessionReplicationRole == pg_sys::SESSION_REPLICATION_ROLE_REPLICA as i32 }
}

/// Whether this process applies rows replicated from elsewhere: one of PostgreSQL's logical
/// replication workers (apply, table sync, parallel apply: their `bgw_type` starts with
/// "logical replication"), which run with `session_replication_role = replica`.
pub fn applies_logical_replication() -> bool {
    unsafe {
        if !replication_role_replica() || pg_sys::MyBgworkerEntry.is_null() {
            return false;
        }
        let kind = std::ffi::CStr::from_ptr((*pg_sys::MyBgworkerEntry).bgw_type.as_ptr());
        kind.to_bytes().starts_with(b"logical replication")
    }
}

/// The server named `name` of the `broadcaster` foreign-data wrapper, if there is one.
pub fn broadcaster_server(name: &str) -> Option<pg_sys::Oid> {
    let name = std::ffi::CString::new(name).ok()?;
    unsafe {
        let wrapper = pg_sys::GetForeignDataWrapperByName(c"broadcaster".as_ptr(), true);
        let server = pg_sys::GetForeignServerByName(name.as_ptr(), true);
        if wrapper.is_null() || server.is_null() || (*server).fdwid != (*wrapper).fdwid {
            return None;
        }
        Some((*server).serverid)
    }
}

/// Whether the current role has USAGE on foreign server `server`.
pub fn may_use_server(server: pg_sys::Oid) -> bool {
    let mode = pg_sys::AclMode::from(pg_sys::ACL_USAGE);
    #[cfg(feature = "pg15")]
    let result = unsafe { pg_sys::pg_foreign_server_aclcheck(server, pg_sys::GetUserId(), mode) };
    #[cfg(not(feature = "pg15"))]
    let result = unsafe {
        pg_sys::object_aclcheck(
            pg_sys::ForeignServerRelationId,
            server,
            pg_sys::GetUserId(),
            mode,
        )
    };
    result == pg_sys::AclResult::ACLCHECK_OK
}

/// This process's PGPROC number, by which others set its latch: its place in
/// `ProcGlobal->allProcs`, what PostgreSQL 17 and later compute the same way
/// (`GetNumberFromPGProc`), 16 and earlier also kept in `PGPROC.pgprocno`. -1 outside one.
pub fn my_procno() -> i32 {
    unsafe {
        let global = pg_sys::ProcGlobal;
        if global.is_null() || pg_sys::MyProc.is_null() {
            return -1;
        }
        let offset = pg_sys::MyProc.offset_from((*global).allProcs);
        i32::try_from(offset).unwrap_or(-1)
    }
}

/// Sets the latch of the process with PGPROC number `procno`; nothing for -1. A stale number
/// only wakes some other process once: latches tolerate spurious sets.
pub fn set_latch(procno: i32) {
    let Ok(index) = u32::try_from(procno) else {
        return;
    };
    unsafe {
        let global = pg_sys::ProcGlobal;
        if global.is_null() || index >= (*global).allProcCount {
            return;
        }
        let proc_ = (*global).allProcs.add(index as usize);
        pg_sys::SetLatch(&raw mut (*proc_).procLatch);
    }
}

/// Calls `callback` at each transaction event of this backend, from now on.
pub fn register_xact_callback(
    callback: unsafe extern "C-unwind" fn(pg_sys::XactEvent::Type, *mut std::ffi::c_void),
) {
    unsafe { pg_sys::RegisterXactCallback(Some(callback), std::ptr::null_mut()) };
}
