//! The hooks broadcaster sets. On utility commands, for what a relay's connection would
//! otherwise break or lose:
//!
//! - `DROP DATABASE`, `ALTER DATABASE ... RENAME`, `ALTER DATABASE ... SET TABLESPACE` and
//!   `CREATE DATABASE ... TEMPLATE`: PostgreSQL refuses them while another process is connected
//!   to the database, so its relay steps aside for the command and the launcher starts it again
//!   afterwards, if the database is still to be served (TimescaleDB stops its schedulers the
//!   same way).
//! - `DROP EXTENSION broadcaster` is refused (SQLSTATE 55006) while the outbox holds events.
//! - `CREATE EXTENSION broadcaster` tells the launcher when it commits, so the relay starts at
//!   once rather than at the launcher's next re-check.
//!
//! And on the server log: PostgreSQL logs every setting a reload changes with its new value,
//! `broadcaster.redis_url` and the password in it included; that value is left out.

use std::ffi::{c_char, CStr};

use pgrx::prelude::*;
use pgrx::PgList;

use crate::shared;

/// The hook that was set before ours, called in turn.
static mut PREVIOUS: pg_sys::ProcessUtility_hook_type = None;

/// The log hook that was set before ours.
static mut PREVIOUS_EMIT: pg_sys::emit_log_hook_type = None;

/// Sets the hooks; from `_PG_init`, once per process (the postmaster's, when preloaded, which
/// every process then inherits).
pub fn install() {
    unsafe {
        PREVIOUS = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
        PREVIOUS_EMIT = pg_sys::emit_log_hook;
        pg_sys::emit_log_hook = Some(redact_secrets);
    }
}

/// The message PostgreSQL logs for each setting a reload changes (guc-file.l), untranslated.
const CHANGED_TO: &CStr = c"parameter \"%s\" changed to \"%s\"";

/// Settings whose value may hold a secret, in lower case: a reload that changes them is logged
/// without it.
const SECRET_SETTINGS: [&str; 1] = ["broadcaster.redis_url"];

/// Called for every message before it is logged, in ErrorContext: replaces PostgreSQL's
/// "parameter changed to" line for a secret setting by one without the value. Recognised by
/// the untranslated message id, then by the setting's current value or its name in any case
/// (a translation quotes it its own way, `postgresql.conf` may spell it in capitals). Raises
/// nothing, allocates only the replacement.
#[pg_guard]
unsafe extern "C-unwind" fn redact_secrets(edata: *mut pg_sys::ErrorData) {
    unsafe {
        let (id, message) = ((*edata).message_id, (*edata).message);
        if !id.is_null() && !message.is_null() && CStr::from_ptr(id) == CHANGED_TO {
            let text = CStr::from_ptr(message).to_string_lossy().to_lowercase();
            let url = crate::guc::redis_url().to_lowercase();
            let secret = (!url.is_empty() && text.contains(&url))
                || SECRET_SETTINGS.iter().any(|name| text.contains(name));
            if secret {
                (*edata).message = pg_sys::pstrdup(
                    c"a setting of broadcaster that may hold a password changed (its value is not logged)"
                        .as_ptr(),
                );
            }
        }
        if let Some(previous) = PREVIOUS_EMIT {
            pg_sys::ffi::pg_guard_ffi_boundary(|| previous(edata));
        }
    }
}

/// What a utility statement means to broadcaster.
enum Command {
    /// Needs the named database to itself.
    NeedsDatabaseAlone(String),
    DropExtension,
    CreateExtension,
    Other,
}

impl Command {
    /// # Safety
    /// `stmt` is a parsed utility statement (or null).
    unsafe fn of(stmt: *mut pg_sys::Node) -> Command {
        if stmt.is_null() {
            return Command::Other;
        }
        unsafe {
            match (*stmt).type_ {
                pg_sys::NodeTag::T_DropdbStmt => {
                    let drop = stmt.cast::<pg_sys::DropdbStmt>();
                    text((*drop).dbname).map_or(Command::Other, Command::NeedsDatabaseAlone)
                }
                pg_sys::NodeTag::T_RenameStmt => {
                    let rename = stmt.cast::<pg_sys::RenameStmt>();
                    if (*rename).renameType != pg_sys::ObjectType::OBJECT_DATABASE {
                        return Command::Other;
                    }
                    text((*rename).subname).map_or(Command::Other, Command::NeedsDatabaseAlone)
                }
                pg_sys::NodeTag::T_CreatedbStmt => {
                    let create = stmt.cast::<pg_sys::CreatedbStmt>();
                    // Without a TEMPLATE option, the copy is of template1.
                    let template = option((*create).options, "template")
                        .unwrap_or_else(|| "template1".to_string());
                    Command::NeedsDatabaseAlone(template)
                }
                pg_sys::NodeTag::T_AlterDatabaseStmt => {
                    let alter = stmt.cast::<pg_sys::AlterDatabaseStmt>();
                    if option((*alter).options, "tablespace").is_none() {
                        return Command::Other;
                    }
                    text((*alter).dbname).map_or(Command::Other, Command::NeedsDatabaseAlone)
                }
                pg_sys::NodeTag::T_DropStmt => {
                    let drop = stmt.cast::<pg_sys::DropStmt>();
                    if (*drop).removeType != pg_sys::ObjectType::OBJECT_EXTENSION {
                        return Command::Other;
                    }
                    let names = PgList::<pg_sys::Node>::from_pg((*drop).objects);
                    let ours = names
                        .iter_ptr()
                        .any(|name| string_node(name).as_deref() == Some("broadcaster"));
                    if ours {
                        Command::DropExtension
                    } else {
                        Command::Other
                    }
                }
                pg_sys::NodeTag::T_CreateExtensionStmt => {
                    let create = stmt.cast::<pg_sys::CreateExtensionStmt>();
                    if text((*create).extname).as_deref() == Some("broadcaster") {
                        Command::CreateExtension
                    } else {
                        Command::Other
                    }
                }
                _ => Command::Other,
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
#[pg_guard]
unsafe extern "C-unwind" fn process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    let command = unsafe { Command::of((*pstmt).utilityStmt) };
    // Held until this transaction ends, committed or not: a RENAME inside a transaction block is
    // not done before its COMMIT, and a relay started in between would find the old name.
    if let Command::NeedsDatabaseAlone(name) = &command {
        if let Some(oid) = crate::pg::database_oid(name) {
            shared::step_aside(oid);
        }
    }
    if matches!(command, Command::DropExtension) {
        refuse_drop_with_undelivered_events();
    }
    // pgrx's binding of standard_ProcessUtility already turns an ERROR into a Rust panic; a raw
    // hook pointer needs the same guard around it, and only it: a guard around a guarded call
    // would unwind that panic through a C frame, which aborts the process.
    unsafe {
        match PREVIOUS {
            Some(previous) => pg_sys::ffi::pg_guard_ffi_boundary(|| {
                previous(
                    pstmt,
                    query_string,
                    read_only_tree,
                    context,
                    params,
                    query_env,
                    dest,
                    qc,
                )
            }),
            None => pg_sys::standard_ProcessUtility(
                pstmt,
                query_string,
                read_only_tree,
                context,
                params,
                query_env,
                dest,
                qc,
            ),
        }
    }
    if matches!(command, Command::CreateExtension) {
        shared::installed_at_commit();
    }
}

/// `DROP EXTENSION broadcaster` would drop the outbox with every event not yet delivered, dead
/// ones included: refused while there are any, so that losing them is a deliberate
/// `DELETE FROM broadcaster_outbox` first.
fn refuse_drop_with_undelivered_events() {
    // Run in the caller's session, with its search_path: every name and operator qualified.
    let schema = Spi::get_one::<String>(
        "SELECT pg_catalog.quote_ident(n.nspname) FROM pg_catalog.pg_extension e \
         JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) e.extnamespace \
         WHERE e.extname OPERATOR(pg_catalog.=) 'broadcaster'::pg_catalog.name",
    );
    // Not installed (DROP EXTENSION IF EXISTS): PostgreSQL answers as usual.
    let Ok(Some(schema)) = schema else {
        return;
    };
    // The lock DROP takes anyway, taken first: a producer's event committed between this count
    // and the drop would otherwise be dropped unseen. The count then sees every committed row.
    let lock = format!("LOCK TABLE {schema}.broadcaster_outbox IN ACCESS EXCLUSIVE MODE");
    if Spi::run(&lock).is_err() {
        return;
    }
    let sql = format!("SELECT pg_catalog.count(*) FROM {schema}.broadcaster_outbox");
    let undelivered = Spi::get_one::<i64>(&sql).ok().flatten().unwrap_or(0);
    if undelivered > 0 {
        crate::error::Error::Undelivered(undelivered).raise("broadcaster");
    }
}

/// # Safety
/// `ptr` is null or a NUL-terminated string.
unsafe fn text(ptr: *const c_char) -> Option<String> {
    (!ptr.is_null()).then(|| {
        unsafe { CStr::from_ptr(ptr) }
            .to_string_lossy()
            .into_owned()
    })
}

/// The value of option `name` in a list of `DefElem`s, as text; None when it is absent or has
/// no value (`DEFAULT`).
///
/// # Safety
/// `options` is a list of `DefElem` nodes (or null).
unsafe fn option(options: *mut pg_sys::List, name: &str) -> Option<String> {
    let options = unsafe { PgList::<pg_sys::DefElem>::from_pg(options) };
    let found = options
        .iter_ptr()
        .find(|&def| unsafe { text((*def).defname) }.as_deref() == Some(name))?;
    // `TEMPLATE DEFAULT` has no argument: none given.
    if unsafe { (*found).arg }.is_null() {
        return None;
    }
    // PostgreSQL's own reading of the option: raises on a value it would refuse too.
    unsafe { text(pg_sys::defGetString(found)) }
}

/// The text of a `String` node (a name in a parse tree).
///
/// # Safety
/// `node` is a `String` node (or null).
unsafe fn string_node(node: *mut pg_sys::Node) -> Option<String> {
    if node.is_null() || unsafe { (*node).type_ } != pg_sys::NodeTag::T_String {
        return None;
    }
    unsafe { text((*node.cast::<pg_sys::String>()).sval) }
}
