//! broadcaster: a transactional outbox inside PostgreSQL. Events written in a transaction are
//! relayed, once it commits, by a background worker to Redis Streams as CloudEvents.
//!
//! The data's path: `broadcaster_publish` / plain INSERT (`api`, `sql/outbox.sql`) → outbox
//! table → relay worker (`worker`) → backend (`backend`) → broker. `event` and `backend` are
//! plain Rust; `api`, `fdw` (named backends), `guc`, `shared`, `hooks` and `worker` are the
//! pgrx side, and `error` is what they raise.

use pgrx::prelude::*;

mod api;
pub mod backend;
mod error;
pub mod event;
mod fdw;
mod guc;
mod hooks;
mod pg;
mod shared;
mod worker;

pub use backend::{
    Backend, BatchError, Config, ConfigError, Options, Outcome, Pipelined, PublisherBackend,
};
pub use event::{EventError, OutboxEvent};

::pgrx::pg_module_magic!(name, version);

extension_sql_file!(
    "../sql/outbox.sql",
    name = "outbox",
    requires = [
        api::broadcaster_outbox_accept,
        api::broadcaster_failures_cleared,
        api::broadcaster_replicated_row,
        api::broadcaster_default_source
    ]
);
extension_sql_file!("../sql/dump.sql", name = "dump", requires = ["outbox"]);
extension_sql_file!(
    "../sql/capture.sql",
    name = "capture",
    requires = ["outbox"]
);
extension_sql_file!(
    "../sql/backends.sql",
    name = "backends",
    requires = ["outbox", fdw::broadcaster_fdw_validator]
);
extension_sql_file!("../sql/grants.sql", name = "grants", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    guc::register();
    let preloading = unsafe { pg_sys::process_shared_preload_libraries_in_progress };
    // The servers pg_upgrade starts (old and new) must run nothing of ours: a relay there would
    // claim events in a cluster whose transaction ids the new one reuses, and its connection
    // would stop pg_upgrade from dropping and re-creating the database.
    if unsafe { pg_sys::IsBinaryUpgrade } {
        if preloading {
            log!("broadcaster: binary upgrade in progress; no relay runs in this server");
        }
        return;
    }
    hooks::install();
    // Shared memory and the worker exist only when preloaded; a plain LOAD (or the first call
    // of a function) gets the SQL surface and the settings, and health reports false.
    if !preloading {
        return;
    }
    shared::init();
    worker::register();
}

/// Hooks for `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        Vec::new()
    }
}

/// The README's Rust examples are compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
