//! The SQL surface written in Rust: row validation and commit-time wake-up (the outbox's row
//! trigger), `broadcaster_publish`, the default `source`, and `broadcaster_health()`. The tables,
//! and the declaration of `broadcaster_publish`, are in `sql/outbox.sql`.

use std::sync::OnceLock;

use pgrx::datum::TryFromDatumError;
use pgrx::prelude::*;
use pgrx::JsonB;

use crate::error::Error;
use crate::event;
use crate::{guc, pg, shared};

/// `'0001-01-01 00:00:00+00'` and `'10000-01-01 00:00:00+00'` as Postgres stores a timestamptz
/// (microseconds from 2000-01-01 UTC): RFC 3339, so CloudEvents, has years 1 to 9999 only. The
/// infinities lie outside.
pub(crate) const TIME_MIN: i64 = -63_082_281_600_000_000;
pub(crate) const TIME_END: i64 = 252_455_616_000_000_000;

/// The outbox's row trigger (BEFORE INSERT OR UPDATE, enabled ALWAYS), so a raw INSERT from
/// any ORM takes the same path as `broadcaster_publish`: validates the row, raising SQLSTATE
/// 22023 naming the column at fault (23514 for a `time` RFC 3339 can't carry; a NULL `type`
/// passes here and NOT NULL answers, 23502), then arranges for the relay to be woken when the
/// transaction commits. A trigger rather than a CHECK constraint: Postgres reads and prepares a
/// CHECK expression again for every INSERT statement, about 7 µs of a one-row INSERT's 30;
/// calling a trigger costs about 1.
#[pg_trigger]
fn broadcaster_outbox_accept<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, TryFromDatumError> {
    let Some(row) = trigger.new() else {
        return Ok(None);
    };
    // A row a logical replication subscriber applies is an event of the publisher, whose relay
    // sends it: kept here too, it would be sent twice. Dropped instead (and its DELETE, when
    // the publisher's relay delivers it, then finds nothing).
    if pg::applies_logical_replication() {
        return Ok(None);
    }
    // A superuser loading data (`session_replication_role = replica`, a superuser-only setting):
    // a restore of rows that today's rules refuse (written under an older version, past a
    // disabled trigger, or above a lower max_event_size) would otherwise fail the whole COPY and
    // lose every event in it. Kept as they are; the relay's own checks send a row it can't
    // encode to dead.
    // The backend column is missing from a table still at 0.1.0 (before ALTER EXTENSION
    // UPDATE): every event there is the default backend's.
    let backend = match row.get_by_name::<&str>("backend") {
        Err(TryFromDatumError::NoSuchAttributeName(_)) => None,
        other => other?,
    };
    if pg::replication_role_replica() {
        shared::wake_at_commit(backend.is_some());
        return Ok(Some(row));
    }
    let column = |name: &str| row.get_by_name::<&str>(name);
    let extensions = row.get_by_name::<JsonB>("extensions")?;
    let stream = column("stream")?;
    // Read only for an event that names a stream: most don't.
    let stream_prefix = stream.map(|_| guc::stream_prefix()).unwrap_or_default();
    let data = row.get_by_name::<JsonText>("data")?;
    accept_time(row.get_by_name::<TimestampWithTimeZone>("time")?);
    let checked = event::EventRow {
        ty: column("type")?,
        source: column("source")?,
        subject: column("subject")?,
        datacontenttype: column("datacontenttype")?,
        dataschema: column("dataschema")?,
        data: data.map(|JsonText(text)| text),
        extensions: extensions.as_ref().map(|JsonB(v)| v),
        stream,
        partition_key: column("partition_key")?,
    }
    .validate(guc::max_event_size(), &stream_prefix);
    if let Err(e) = checked {
        Error::from(e).raise("broadcaster_outbox_accept");
    }
    if let Some(name) = backend {
        crate::fdw::check_backend_use(name);
    }
    shared::wake_at_commit(backend.is_some());
    Ok(Some(row))
}

/// Row trigger (BEFORE INSERT, UPDATE or DELETE) on every table of the extension, enabled
/// REPLICA: it fires only with `session_replication_role = replica`, so never on the relay's or
/// producers' own writes. A subscriber that replicates these tables from a publisher keeps its
/// own: the publisher's relay delivers the publisher's events, and its deletes and failures
/// share `seq`s with the subscriber's own events, which they must not touch.
#[pg_trigger]
fn broadcaster_replicated_row<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, TryFromDatumError> {
    if pg::applies_logical_replication() {
        return Ok(None);
    }
    Ok(trigger.new().or_else(|| trigger.old()))
}

/// `broadcaster_failures`' statement trigger (AFTER DELETE): rows leaving it are events
/// requeued or discarded, or delivered at last; the relay is woken when the transaction
/// commits, so a requeued event goes at once.
#[pg_trigger]
fn broadcaster_failures_cleared<'a>(
    _trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, TryFromDatumError> {
    shared::wake_at_commit(false);
    shared::wake_at_commit(true);
    Ok(None)
}

/// A `json` value as its text, borrowed from the row: json is text inside, and the trigger
/// never needs it parsed into a value (pgrx's `Json` would, and its `JsonString` copies it and
/// can't be read from a row).
struct JsonText<'a>(&'a str);

impl JsonText<'_> {
    /// # Safety
    /// `datum` is a non-null json datum, alive while the result is used.
    unsafe fn of<'a>(datum: pg_sys::Datum) -> JsonText<'a> {
        unsafe {
            let text = pg_sys::pg_detoast_datum_packed(datum.cast_mut_ptr());
            let bytes = pgrx::varlena::varlena_to_byte_slice(text);
            // In a database whose encoding is not UTF-8, json may hold other bytes: the relay
            // could not send them as they are, so they are refused (as no JSON).
            JsonText(std::str::from_utf8(bytes).unwrap_or(NOT_UTF8))
        }
    }
}

/// What [`JsonText`] reads for bytes that are not UTF-8: not JSON, so refused as such.
const NOT_UTF8: &str = "\u{0}(data is not UTF-8)";

impl FromDatum for JsonText<'_> {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        _: pg_sys::Oid,
    ) -> Option<Self> {
        // SAFETY: a non-null json datum is a varlena; detoasted (if at all) into the current
        // memory context, which outlives the trigger's use of the text.
        (!is_null).then(|| unsafe { JsonText::of(datum) })
    }
}

impl IntoDatum for JsonText<'_> {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        self.0.into_datum()
    }

    fn type_oid() -> pg_sys::Oid {
        pg_sys::JSONOID
    }
}

// SAFETY: as `&str`'s: a json datum is text inside.
unsafe impl pgrx::datum::UnboxDatum for JsonText<'_> {
    type As<'src>
        = JsonText<'src>
    where
        Self: 'src;

    unsafe fn unbox<'src>(datum: pgrx::datum::Datum<'src>) -> JsonText<'src>
    where
        Self: 'src,
    {
        unsafe { JsonText::of(datum.sans_lifetime()) }
    }
}

/// A `time` RFC 3339 can carry, or ERROR 23514 (the other columns: [`event::EventRow`]).
fn accept_time(time: Option<TimestampWithTimeZone>) {
    let Some(time) = time else {
        return;
    };
    let micros = pg_sys::TimestampTz::from(time);
    if !(TIME_MIN..TIME_END).contains(&micros) {
        Error::InvalidTime(time.to_string()).raise("broadcaster_outbox_accept");
    }
}

/// `broadcaster_publish(type, data, source, subject, partition_key, extensions, stream,
/// backend)` (0.1.0's declaration has no `backend`),
/// declared in `sql/outbox.sql` as a C function: one INSERT through a plan kept for the session.
/// A producer usually publishes once per transaction, and a PL/pgSQL function pays at the first
/// call of each transaction to set up and revalidate its expressions and plans. Runs with the
/// caller's rights (INSERT on the outbox); values are checked by the outbox's trigger, as for a
/// raw INSERT.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn broadcaster_publish(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    unsafe {
        let fcinfo = &mut *fcinfo;
        let nargs = usize::try_from(fcinfo.nargs).unwrap_or(0);
        if !(PUBLISH_ARGS_0_1..=PUBLISH_ARGS).contains(&nargs) {
            error!("broadcaster_publish: expected {PUBLISH_ARGS} arguments");
        }
        // The INSERT's parameters: the arguments (backend NULL when not declared), then the
        // id. It is made here, in the caller's memory, and returned: RETURNING it would need
        // SELECT rights.
        let mut values = [pg_sys::Datum::from(0usize); PUBLISH_ARGS + 1];
        let mut nulls = [b'n' as std::ffi::c_char; PUBLISH_ARGS + 1];
        for (i, arg) in fcinfo.args.as_slice(nargs).iter().enumerate() {
            nulls[i] = b' ' as std::ffi::c_char;
            values[i] = arg.value;
            if arg.isnull {
                nulls[i] = b'n' as std::ffi::c_char;
            }
        }
        // Called through SQL only: DirectFunctionCall would give no function to look up.
        if fcinfo.flinfo.is_null() {
            error!("broadcaster_publish: call it from SQL");
        }
        let function = publish_function((*fcinfo.flinfo).fn_oid);
        // The INSERT takes json. A jsonb value is printed as PostgreSQL prints it; text goes
        // through json's own input function, as an untyped literal did when data was json only:
        // kept byte for byte, and 22P02 when it is not JSON.
        if nulls[1] == b' ' as std::ffi::c_char {
            values[1] = match function.data_type {
                pg_sys::JSONBOID => {
                    let text = call(pg_sys::jsonb_out, values[1], "jsonb_out");
                    pg_sys::Datum::from(pg_sys::cstring_to_text(text.cast_mut_ptr()))
                }
                pg_sys::TEXTOID => {
                    let text = call(pg_sys::textout, values[1], "textout");
                    call(pg_sys::json_in, text, "json_in")
                }
                _ => values[1],
            };
        }
        let Some(id) = pgrx::direct_function_call_as_datum(pg_sys::gen_random_uuid, &[]) else {
            error!("broadcaster_publish: gen_random_uuid returned NULL");
        };
        values[PUBLISH_ARGS] = id;
        nulls[PUBLISH_ARGS] = b' ' as std::ffi::c_char;
        if pg_sys::SPI_connect() < 0 {
            error!("broadcaster_publish: SPI_connect failed");
        }
        let plan = publish_plan(function.schema, nargs == PUBLISH_ARGS);
        let rc = pg_sys::SPI_execute_plan(plan, values.as_mut_ptr(), nulls.as_ptr(), false, 0);
        if rc != pg_sys::SPI_OK_INSERT as i32 {
            error!("broadcaster_publish: the INSERT failed (SPI code {rc})");
        }
        pg_sys::SPI_finish();
        id
    }
}

/// `function(argument)` through fmgr; ERROR if it returns NULL (none of those called does).
unsafe fn call(
    function: unsafe fn(pg_sys::FunctionCallInfo) -> pg_sys::Datum,
    argument: pg_sys::Datum,
    name: &str,
) -> pg_sys::Datum {
    match unsafe { pgrx::direct_function_call_as_datum(function, &[Some(argument)]) } {
        Some(result) => result,
        None => error!("broadcaster_publish: {name} returned NULL"),
    }
}

/// Version-1 calling convention for [`broadcaster_publish`].
#[no_mangle]
pub extern "C" fn pg_finfo_broadcaster_publish() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// `broadcaster_publish`'s arguments.
const PUBLISH_ARGS: usize = 8;
/// Those of 0.1.0's declaration, without `backend`, served until `ALTER EXTENSION ... UPDATE`.
const PUBLISH_ARGS_0_1: usize = 7;

/// What `broadcaster_publish` needs to know of the SQL function it was called as: one of three
/// overloads (data text, json or jsonb), all this C function.
#[derive(Clone, Copy)]
struct PublishFunction {
    oid: pg_sys::Oid,
    /// The extension's schema, where its INSERT goes.
    schema: pg_sys::Oid,
    /// The declared type of `data`.
    data_type: pg_sys::Oid,
}

thread_local! {
    /// The overload called last: looked up again only when another is called.
    static PUBLISH_FUNCTION: std::cell::Cell<PublishFunction> = const {
        std::cell::Cell::new(PublishFunction {
            oid: pg_sys::InvalidOid,
            schema: pg_sys::InvalidOid,
            data_type: pg_sys::InvalidOid,
        })
    };
    /// `broadcaster_publish`'s INSERT, planned once per session, for the schema it was made
    /// for (another after DROP and CREATE EXTENSION in another schema) and whether it names
    /// `backend`, and shared by the three overloads. Postgres plans it again when the table
    /// changes.
    static PUBLISH_PLAN: std::cell::Cell<(pg_sys::Oid, bool, pg_sys::SPIPlanPtr)> =
        const { std::cell::Cell::new((pg_sys::InvalidOid, false, std::ptr::null_mut())) };
}

/// The overload `oid` of `broadcaster_publish`: its schema and its `data` type.
unsafe fn publish_function(oid: pg_sys::Oid) -> PublishFunction {
    let known = PUBLISH_FUNCTION.get();
    if known.oid == oid {
        return known;
    }
    unsafe {
        let mut argtypes: *mut pg_sys::Oid = std::ptr::null_mut();
        let mut nargs: std::ffi::c_int = 0;
        pg_sys::get_func_signature(oid, &mut argtypes, &mut nargs);
        let declared = usize::try_from(nargs).unwrap_or(0);
        if argtypes.is_null() || !(PUBLISH_ARGS_0_1..=PUBLISH_ARGS).contains(&declared) {
            error!("broadcaster_publish: expected {PUBLISH_ARGS} arguments");
        }
        let function = PublishFunction {
            oid,
            schema: pg_sys::get_func_namespace(oid),
            data_type: *argtypes.add(1),
        };
        PUBLISH_FUNCTION.set(function);
        function
    }
}

/// The kept plan of `broadcaster_publish`'s INSERT into the outbox of `schema`, prepared at its
/// first call: the arguments as `$1` to `$8` (data as json), the id as `$9`; `$8`, backend,
/// left out for `0.1.0`'s declaration (`with_backend` false), whose table has no such column.
/// Inside SPI_connect.
unsafe fn publish_plan(schema: pg_sys::Oid, with_backend: bool) -> pg_sys::SPIPlanPtr {
    let (made_for, made_with_backend, plan) = PUBLISH_PLAN.get();
    if made_for == schema && made_with_backend == with_backend && !plan.is_null() {
        return plan;
    }
    unsafe {
        if !plan.is_null() {
            // Forgotten before anything below can raise an error.
            PUBLISH_PLAN.set((pg_sys::InvalidOid, false, std::ptr::null_mut()));
            pg_sys::SPI_freeplan(plan);
        }
        let name = pg_sys::get_namespace_name(schema);
        if name.is_null() {
            error!("broadcaster_publish: its schema is gone");
        }
        let quoted = std::ffi::CStr::from_ptr(pg_sys::quote_identifier(name))
            .to_string_lossy()
            .into_owned();
        let (column, value) = if with_backend {
            (", backend", ", $8")
        } else {
            ("", "")
        };
        let sql = format!(
            "INSERT INTO {quoted}.broadcaster_outbox \
                    (type, data, source, subject, partition_key, extensions, stream, id{column}) \
             VALUES ($1, $2, coalesce($3, {quoted}.broadcaster_default_source()), $4, $5, \
                     coalesce($6, '{{}}'), $7, $9{value})"
        );
        let mut types = [
            pg_sys::TEXTOID,
            pg_sys::JSONOID,
            pg_sys::TEXTOID,
            pg_sys::TEXTOID,
            pg_sys::TEXTOID,
            pg_sys::JSONBOID,
            pg_sys::TEXTOID,
            pg_sys::TEXTOID,
            pg_sys::UUIDOID,
        ];
        let Ok(sql) = std::ffi::CString::new(sql) else {
            error!("broadcaster_publish: its schema's name holds a NUL");
        };
        let plan = pg_sys::SPI_prepare(sql.as_ptr(), types.len() as i32, types.as_mut_ptr());
        if plan.is_null() || pg_sys::SPI_keepplan(plan) != 0 {
            error!("broadcaster_publish: could not prepare its INSERT");
        }
        PUBLISH_PLAN.set((schema, with_backend, plan));
        plan
    }
}

/// The `source` of events written without one: `broadcaster.default_source`, or
/// `postgresql:///<database>`.
#[pg_extern(stable, parallel_safe)]
fn broadcaster_default_source() -> String {
    static FOR_THIS_DATABASE: OnceLock<String> = OnceLock::new();
    guc::default_source().unwrap_or_else(|| {
        FOR_THIS_DATABASE
            .get_or_init(|| event::default_source_for(&pg::my_database_name()))
            .clone()
    })
}

/// The relays' shared-memory state, raw; `broadcaster_status` presents it. `state` is
/// `running`, `read only` (running, but waiting: its database is read-only), `stopped`, or, on
/// a hot standby, `standby` for each database `broadcaster.database` lists (no relay runs there
/// until promotion).
// pgrx reads the column names from `name!` in the signature, so it can't be a type alias.
// Its C symbol is named after the Rust function, not the SQL one: 0.1.0 declared 10 columns
// (no `state`), and an old declaration meeting this library must fail to find its symbol
// rather than have 11 columns written into a 10-column row.
#[allow(clippy::type_complexity)]
#[pg_extern(volatile, parallel_safe, name = "broadcaster_relays")]
fn broadcaster_relay_states() -> TableIterator<
    'static,
    (
        name!(database, pg_sys::Oid),
        name!(backend, Option<String>),
        name!(kind, Option<String>),
        name!(pid, Option<i32>),
        name!(state, &'static str),
        name!(healthy, bool),
        name!(last_success_us, Option<i64>),
        name!(last_error, Option<String>),
        name!(last_error_us, Option<i64>),
        name!(published, i64),
        name!(failed, i64),
        name!(started_us, Option<i64>),
        name!(recent_rate, f64),
        name!(warning, Option<String>),
    ),
> {
    let timeout_us = i64::try_from(guc::health_timeout().as_micros()).unwrap_or(i64::MAX);
    let nonzero = |v: i64| (v != 0).then_some(v);
    let standby = pg::in_recovery();
    let mut relays = shared::relays();
    if standby {
        // Shared memory holds nothing of a primary's relays here: one row per listed database.
        relays = guc::databases()
            .iter()
            .filter_map(|name| pg::database_oid(name).map(shared::RelayState::of))
            .collect();
    }
    TableIterator::new(relays.into_iter().map(move |r| {
        let state = match () {
            _ if standby => "standby",
            _ if r.pid == 0 => "stopped",
            _ if r.read_only => "read only",
            _ => "running",
        };
        (
            pg_sys::Oid::from(r.database),
            r.backend(),
            r.kind(),
            (r.pid != 0).then_some(r.pid),
            state,
            r.healthy(timeout_us),
            nonzero(r.last_ok),
            r.last_error(),
            nonzero(r.last_error_at),
            i64::try_from(r.published).unwrap_or(i64::MAX),
            i64::try_from(r.failed).unwrap_or(i64::MAX),
            nonzero(r.started_at),
            r.recent_rate,
            r.warning(),
        )
    }))
}

/// 0.1.0's `broadcaster_relays()`: the same rows without `state` (10 columns), under the C
/// symbol 0.1.0's SQL names. With it this library serves a database still at 0.1.0 until
/// `ALTER EXTENSION broadcaster UPDATE` runs there; 0.2.0's SQL does not declare it.
#[allow(clippy::type_complexity)]
#[pg_extern(volatile, parallel_safe, sql = false)]
fn broadcaster_relays() -> TableIterator<
    'static,
    (
        name!(database, pg_sys::Oid),
        name!(pid, Option<i32>),
        name!(healthy, bool),
        name!(last_success_us, Option<i64>),
        name!(last_error, Option<String>),
        name!(last_error_us, Option<i64>),
        name!(published, i64),
        name!(failed, i64),
        name!(started_us, Option<i64>),
        name!(recent_rate, f64),
    ),
> {
    // 0.1.0 knew one backend per database: its rows are the default backends'.
    TableIterator::new(broadcaster_relay_states().filter(|r| r.1.is_none()).map(
        |(
            database,
            _backend,
            _kind,
            pid,
            _state,
            healthy,
            ok,
            error,
            error_at,
            published,
            failed,
            started,
            rate,
            _warning,
        )| {
            (
                database, pid, healthy, ok, error, error_at, published, failed, started, rate,
            )
        },
    ))
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    /// The SQLSTATE `sql` fails with, or None when it succeeds. Runs in a subtransaction so
    /// the test can go on after the error.
    fn sqlstate_of(sql: &str) -> Option<String> {
        Spi::run(
            "CREATE OR REPLACE FUNCTION pg_temp.sqlstate_of(q text) RETURNS text \
             LANGUAGE plpgsql AS $f$ BEGIN EXECUTE q; RETURN NULL; \
             EXCEPTION WHEN OTHERS THEN RETURN SQLSTATE; END $f$",
        )
        .expect("helper");
        Spi::get_one_with_args::<String>("SELECT pg_temp.sqlstate_of($1)", &[sql.into()])
            .expect("probe")
    }

    fn count() -> i64 {
        Spi::get_one::<i64>("SELECT count(*) FROM broadcaster_outbox")
            .ok()
            .flatten()
            .unwrap_or(-1)
    }

    #[pg_test]
    fn insert_naming_only_type_and_data_gets_defaults() {
        Spi::run("INSERT INTO broadcaster_outbox (type, data) VALUES ('t.created', '{\"a\":1}')")
            .expect("insert");
        let row = Spi::get_two::<String, String>(
            "SELECT source, datacontenttype FROM broadcaster_outbox",
        )
        .expect("row");
        assert_eq!(row.0.as_deref(), Some("postgresql:///pgrx_tests"));
        assert_eq!(row.1.as_deref(), Some("application/json"));
        let pending = Spi::get_one::<bool>(
            "SELECT extensions = '{}' AND id IS NOT NULL AND time IS NOT NULL \
             AND NOT EXISTS (SELECT 1 FROM broadcaster_failures) FROM broadcaster_outbox",
        )
        .expect("row");
        assert_eq!(pending, Some(true));
    }

    #[pg_test]
    fn publish_returns_the_id_it_wrote() {
        let id = Spi::get_one::<pgrx::Uuid>(
            "SELECT broadcaster_publish(type => 'order.created', data => '{\"n\":1}', \
             subject => 'o-1', partition_key => 'c-1', extensions => '{\"tenant\":\"acme\"}', \
             stream => 'orders')",
        )
        .expect("publish")
        .expect("an id");
        let found = Spi::get_one_with_args::<bool>(
            "SELECT type = 'order.created' AND subject = 'o-1' AND partition_key = 'c-1' \
             AND extensions = '{\"tenant\":\"acme\"}' AND stream = 'orders' \
             AND data::text = '{\"n\":1}' AND source = broadcaster_default_source() \
             FROM broadcaster_outbox WHERE id = $1",
            &[id.into()],
        )
        .expect("query");
        assert_eq!(found, Some(true));
    }

    /// The `data` `broadcaster_publish(...)` (SQL, returning the id) stored.
    fn data_of(call: &str) -> Option<String> {
        let id = Spi::get_one::<String>(&format!("SELECT ({call})::text"))
            .expect("publish")
            .expect("an id");
        Spi::get_one::<String>(&format!(
            "SELECT data::text FROM broadcaster_outbox WHERE id = '{id}'"
        ))
        .expect("its row")
    }

    #[pg_test]
    fn publish_takes_json_jsonb_text_and_untyped_data() {
        let cases = [
            // json and untyped text: byte for byte.
            (
                r#"broadcaster_publish('t', '{"a":  1, "a": 2}')"#,
                Some(r#"{"a":  1, "a": 2}"#),
            ),
            (
                r#"broadcaster_publish('t', '{"a":  1}'::json)"#,
                Some(r#"{"a":  1}"#),
            ),
            (
                r#"broadcaster_publish('t', '{"a":  1}'::text)"#,
                Some(r#"{"a":  1}"#),
            ),
            (
                r#"broadcaster_publish('t', json_build_object('a', 1))"#,
                Some(r#"{"a" : 1}"#),
            ),
            // jsonb: as PostgreSQL prints it.
            (
                r#"broadcaster_publish('t', '{"a":  1}'::jsonb)"#,
                Some(r#"{"a": 1}"#),
            ),
            (
                r#"broadcaster_publish('t', jsonb_build_object('a', 1))"#,
                Some(r#"{"a": 1}"#),
            ),
            // By name, every overload.
            (
                r#"broadcaster_publish(type => 't', data => '{"b":2}')"#,
                Some(r#"{"b":2}"#),
            ),
            (
                r#"broadcaster_publish(type => 't', data => '{"b":2}'::jsonb, subject => 's')"#,
                Some(r#"{"b": 2}"#),
            ),
            (
                r#"broadcaster_publish(subject => 's', data => '{"b":2}'::json, type => 't')"#,
                Some(r#"{"b":2}"#),
            ),
            // No data, however said.
            ("broadcaster_publish('t')", None),
            ("broadcaster_publish('t', NULL)", None),
            ("broadcaster_publish('t', NULL::jsonb)", None),
            ("broadcaster_publish('t', NULL::json)", None),
            ("broadcaster_publish(type => 't', subject => 's')", None),
        ];
        for (call, want) in cases {
            assert_eq!(data_of(call).as_deref(), want, "{call}");
        }
        // A trigger of the application's, on the row as jsonb: the issue's example.
        Spi::run(
            "CREATE TABLE orders (id int PRIMARY KEY, total numeric); \
             CREATE FUNCTION orders_changed() RETURNS trigger LANGUAGE plpgsql AS \
               $$BEGIN PERFORM broadcaster_publish('order.changed', to_jsonb(NEW)); RETURN NEW; END$$; \
             CREATE TRIGGER orders_changed AFTER INSERT ON orders \
               FOR EACH ROW EXECUTE FUNCTION orders_changed(); \
             INSERT INTO orders VALUES (42, 9.90)",
        )
        .expect("the application's trigger");
        let data = Spi::get_one::<String>(
            "SELECT data::text FROM broadcaster_outbox WHERE type = 'order.changed'",
        )
        .expect("its event");
        assert_eq!(data.as_deref(), Some(r#"{"id": 42, "total": 9.90}"#));
        // Not JSON: the same SQLSTATE as when data was json only.
        assert_eq!(
            sqlstate_of("SELECT broadcaster_publish('t', 'not json'::text)").as_deref(),
            Some("22P02")
        );
    }

    #[pg_test]
    fn publish_with_only_a_type() {
        let id = Spi::get_one::<pgrx::Uuid>("SELECT broadcaster_publish('ping')").expect("publish");
        assert!(id.is_some());
        assert_eq!(count(), 1);
    }

    #[pg_test]
    fn default_source_follows_the_setting() {
        Spi::run("SET broadcaster.default_source = 'urn:shop'").expect("set");
        Spi::run("SELECT broadcaster_publish('t')").expect("publish");
        let source = Spi::get_one::<String>("SELECT source FROM broadcaster_outbox").expect("row");
        assert_eq!(source.as_deref(), Some("urn:shop"));
    }

    #[pg_test]
    fn bad_input_is_refused_with_a_sqlstate() {
        let cases = [
            ("SELECT broadcaster_publish(NULL)", "23502"),
            ("SELECT broadcaster_publish('')", "22023"),
            (
                "INSERT INTO broadcaster_outbox (type) VALUES (NULL)",
                "23502",
            ),
            ("INSERT INTO broadcaster_outbox (type) VALUES ('')", "22023"),
            (
                "SELECT broadcaster_publish('t', source => 'not a uri')",
                "22023",
            ),
            (
                "INSERT INTO broadcaster_outbox (type, source) VALUES ('t', '')",
                "22023",
            ),
            (
                "INSERT INTO broadcaster_outbox (type, dataschema) VALUES ('t', 'relative/x')",
                "22023",
            ),
            (
                "SELECT broadcaster_publish('t', extensions => '{\"Bad-Name\":1}')",
                "22023",
            ),
            (
                "SELECT broadcaster_publish('t', extensions => '{\"waytoolongextensionname\":1}')",
                "22023",
            ),
            (
                "SELECT broadcaster_publish('t', extensions => '{\"id\":\"x\"}')",
                "22023",
            ),
            (
                "SELECT broadcaster_publish('t', extensions => '{\"a\":{\"b\":1}}')",
                "22023",
            ),
            (
                "SELECT broadcaster_publish('t', extensions => '[1]')",
                "22023",
            ),
            ("SELECT broadcaster_publish('t', stream => '')", "22023"),
            (
                "SELECT broadcaster_publish('t', partition_key => '')",
                "22023",
            ),
            (
                "INSERT INTO broadcaster_outbox (type, time) VALUES ('t', 'infinity')",
                "23514",
            ),
            (
                "INSERT INTO broadcaster_outbox (type, time) VALUES ('t', '-infinity')",
                "23514",
            ),
            (
                "INSERT INTO broadcaster_outbox (type, time) VALUES ('t', '10000-01-01 00:00:00+00')",
                "23514",
            ),
            (
                "INSERT INTO broadcaster_outbox (type, time) VALUES ('t', '0001-01-01 00:00:00+00'::timestamptz - interval '1 microsecond')",
                "23514",
            ),
            (
                "SELECT broadcaster_publish('t', extensions => \
                 (SELECT jsonb_object_agg('e' || g, g) FROM generate_series(1, 101) g))",
                "22023",
            ),
            (
                "SELECT broadcaster_publish('t', data => 'not json')",
                "22P02",
            ),
            (
                "INSERT INTO broadcaster_outbox (type, datacontenttype) VALUES ('t', '')",
                "22023",
            ),
            (
                "INSERT INTO broadcaster_outbox (id, type) VALUES ('nope', 't')",
                "22P02",
            ),
            // What the relay could not send in one of its modes: refused when written.
            (
                r#"SELECT broadcaster_publish('t', data => '{"s": "\ud83d"}')"#,
                "22023",
            ),
            (
                "SELECT broadcaster_publish('t', data => (repeat('[', 200) || repeat(']', 200))::json)",
                "22023",
            ),
            ("SELECT broadcaster_publish(E't\\tx')", "22023"),
            (
                "INSERT INTO broadcaster_outbox (type, subject) VALUES ('t', E'a\\nb')",
                "22023",
            ),
            (
                "SELECT broadcaster_publish('t', partition_key => E'k\\u0085')",
                "22023",
            ),
            (
                r#"SELECT broadcaster_publish('t', extensions => '{"n": 2147483648}')"#,
                "22023",
            ),
            (
                r#"SELECT broadcaster_publish('t', extensions => '{"s": "a\u001b[31m"}')"#,
                "22023",
            ),
            // Above broadcaster.max_event_size (1MB by default).
            (
                "SELECT broadcaster_publish('t', json_build_object('b', repeat('x', 1100000)))",
                "54000",
            ),
        ];
        for (sql, expected) in cases {
            assert_eq!(sqlstate_of(sql).as_deref(), Some(expected), "{sql}");
        }
        assert_eq!(count(), 0, "nothing half-written");
    }

    #[pg_test]
    fn time_bounds_are_the_first_and_last_rfc3339_instants() {
        let at = |sql: &str| {
            Spi::get_one::<TimestampWithTimeZone>(sql)
                .expect("query")
                .map(pg_sys::TimestampTz::from)
        };
        assert_eq!(
            at("SELECT '0001-01-01 00:00:00+00'::timestamptz"),
            Some(super::TIME_MIN)
        );
        assert_eq!(
            at("SELECT '10000-01-01 00:00:00+00'::timestamptz"),
            Some(super::TIME_END)
        );
    }

    #[pg_test]
    fn good_input_is_accepted() {
        for sql in [
            "SELECT broadcaster_publish('t', source => 'https://shop.example/orders')",
            "SELECT broadcaster_publish('t', extensions => '{\"traceparent\":\"00-a-b-01\",\"n\":3,\"ok\":true}')",
            "INSERT INTO broadcaster_outbox (type, dataschema, datacontenttype, data) \
             VALUES ('t', 'https://example.com/s.json', 'text/plain', '\"hi\"')",
            "INSERT INTO broadcaster_outbox (type, time) VALUES ('t', '0001-01-01 00:00:00+00')",
            "INSERT INTO broadcaster_outbox (type, time) VALUES ('t', '9999-12-31 23:59:59.999999+00')",
        ] {
            assert_eq!(sqlstate_of(sql), None, "{sql}");
        }
    }

    #[pg_test]
    fn requeue_and_discard_touch_only_dead_events() {
        Spi::run(
            "INSERT INTO broadcaster_outbox (id, type) VALUES \
             ('00000000-0000-0000-0000-000000000001', 'a'), \
             ('00000000-0000-0000-0000-000000000002', 'b'), \
             ('00000000-0000-0000-0000-000000000003', 'c'); \
             INSERT INTO broadcaster_failures \
                    (seq, attempts, next_attempt_at, dead, last_error) \
             SELECT seq, 10, now(), type <> 'c', 'WRONGTYPE' FROM broadcaster_outbox",
        )
        .expect("rows");
        let listed =
            Spi::get_one::<i64>("SELECT count(*) FROM broadcaster_dead_events").expect("view");
        assert_eq!(listed, Some(2));
        let requeued = Spi::get_one::<i64>(
            "SELECT broadcaster_requeue(ARRAY['00000000-0000-0000-0000-000000000001', \
             '00000000-0000-0000-0000-000000000003']::uuid[])",
        )
        .expect("requeue");
        assert_eq!(requeued, Some(1), "the pending row is not dead");
        let reset = Spi::get_one::<i64>(
            "SELECT count(*) FROM broadcaster_failures f JOIN broadcaster_outbox o USING (seq) \
             WHERE o.id = '00000000-0000-0000-0000-000000000001'",
        )
        .expect("row");
        assert_eq!(reset, Some(0), "requeued: no failure left against it");
        assert_eq!(
            Spi::get_one::<i64>("SELECT broadcaster_discard_all()").expect("discard"),
            Some(1)
        );
        assert_eq!(count(), 2);
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM broadcaster_failures").expect("count"),
            Some(1),
            "the discarded event's failure went with it; the pending one's stays"
        );
        assert_eq!(
            Spi::get_one::<i64>("SELECT broadcaster_requeue_all()").expect("requeue"),
            Some(0)
        );
    }

    #[pg_test]
    fn health_is_false_without_a_worker() {
        // The test cluster does not preload the library, so no worker runs.
        assert_eq!(
            Spi::get_one::<bool>("SELECT broadcaster_health()").expect("query"),
            Some(false)
        );
    }

    #[pg_test]
    fn nothing_is_granted_to_public() {
        let public_grants = Spi::get_one::<i64>(
            "SELECT count(*) FROM information_schema.role_routine_grants \
             WHERE grantee = 'PUBLIC' AND routine_name IN ('broadcaster_publish', 'broadcaster_health', \
             'broadcaster_requeue', 'broadcaster_requeue_all', 'broadcaster_discard', 'broadcaster_discard_all', \
             'broadcaster_status', 'broadcaster_relays')",
        )
        .expect("query");
        assert_eq!(public_grants, Some(0));
        let table_grants = Spi::get_one::<i64>(
            "SELECT count(*) FROM information_schema.role_table_grants \
             WHERE grantee = 'PUBLIC' AND table_name IN ('broadcaster_outbox', 'broadcaster_failures')",
        )
        .expect("query");
        assert_eq!(table_grants, Some(0));
    }
}
