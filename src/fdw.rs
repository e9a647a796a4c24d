//! Named backends as foreign servers of the `broadcaster` foreign-data wrapper, as `dblink` and
//! `postgres_fdw` keep their connection settings: the wrapper's validator, the check an event
//! naming a backend passes when it is written, and per-backend health.
//!
//! ```sql
//! CREATE SERVER audit FOREIGN DATA WRAPPER broadcaster
//!     OPTIONS (backend 'redis', url 'redis://audit-redis:6379', stream 'audit');
//! CREATE USER MAPPING FOR PUBLIC SERVER audit OPTIONS (url 'redis://:secret@audit-redis:6379');
//! GRANT USAGE ON FOREIGN SERVER audit TO app;
//! ```

use pgrx::prelude::*;

use crate::backend::{ConfigError, Context, Kind, Options, KIND_OPTION, REGISTRY};
use crate::error::Error;
use crate::worker::function;
use crate::{guc, pg, shared};

fn refuse(e: ConfigError) -> ! {
    Error::from(e).raise("broadcaster_fdw_validator")
}

/// The wrapper's validator: checks the options of `CREATE` and `ALTER` of the wrapper, its
/// servers and user mappings, so that a server that is accepted can be relayed to.
///
/// - a server needs `backend` (a kind of the registry, or `function`) and takes that kind's
///   options; `file` and `function` servers only from a superuser (42501);
/// - a user mapping takes the options that may hold a secret (`url`);
/// - the wrapper and foreign tables take none.
///
/// Unknown option: SQLSTATE HV00D. Unknown backend, missing `backend`, bad value: 22023.
#[pg_extern]
fn broadcaster_fdw_validator(options: Option<Vec<Option<String>>>, catalog: pg_sys::Oid) {
    let pairs: Vec<(String, String)> = options
        .unwrap_or_default()
        .into_iter()
        .flatten()
        .map(|entry| match entry.split_once('=') {
            Some((name, value)) => (name.to_string(), value.to_string()),
            None => (entry, String::new()),
        })
        .collect();
    let options = Options::new(pairs.clone());
    if catalog == pg_sys::ForeignServerRelationId {
        let Some(kind) = options.get(KIND_OPTION).map(str::to_string) else {
            Error::MissingKind {
                known: format!("{}, {}", crate::backend::known_kinds(), function::KIND),
            }
            .raise("broadcaster_fdw_validator")
        };
        let without_kind = Options::new(pairs.into_iter().filter(|(n, _)| n != KIND_OPTION))
            .with_context(Context {
                server: Some("server".into()),
                database: String::new(),
                ..Context::default()
            });
        if kind == function::KIND {
            if !pg::superuser() {
                refuse(ConfigError::SuperuserOnly {
                    kind: function::KIND,
                });
            }
            let mut allowed = vec![KIND_OPTION];
            allowed.extend_from_slice(function::OPTIONS);
            options.only(&allowed).unwrap_or_else(|e| refuse(e));
            let named = options.text("function", "");
            function::resolve(&named).unwrap_or_else(|e| refuse(e));
            options
                .parse::<u64>("statement_timeout", 0)
                .unwrap_or_else(|e| refuse(e));
            return;
        }
        let kind = Kind::find(&kind).unwrap_or_else(|e| refuse(e));
        let superuser = pg::superuser();
        if kind.superuser_only && !superuser {
            refuse(ConfigError::SuperuserOnly { kind: kind.name });
        }
        // pg_foreign_server shows a server's options to every role; a user mapping's, only
        // as PostgreSQL allows for mappings.
        if let Some(name) = kind
            .secrets
            .iter()
            .find(|n| !kind.options.contains(n) && options.get(n).is_some())
        {
            refuse(ConfigError::InvalidValue {
                name: name.to_string(),
                why: "it is a secret, which every role can read in a server's options: put it in a USER MAPPING".into(),
            });
        }
        let mut allowed = vec![KIND_OPTION];
        allowed.extend_from_slice(kind.options);
        options.only(&allowed).unwrap_or_else(|e| refuse(e));
        if let Some(name) = kind
            .superuser_options
            .iter()
            .find(|n| !superuser && options.get(n).is_some())
        {
            refuse(ConfigError::SuperuserOption {
                name: name.to_string(),
            });
        }
        if let Some(name) = kind
            .secrets
            .iter()
            .find(|n| options.get(n).is_some_and(crate::backend::has_password))
        {
            refuse(ConfigError::InvalidValue {
                name: name.to_string(),
                why: "it holds a password, which every role can read in a server's options: put it in a USER MAPPING".into(),
            });
        }
        kind.validate(&without_kind).unwrap_or_else(|e| refuse(e));
    } else if catalog == pg_sys::UserMappingRelationId {
        let mut secrets: Vec<&str> = REGISTRY
            .iter()
            .flat_map(|k| k.secrets.iter().copied())
            .collect();
        secrets.sort_unstable();
        secrets.dedup();
        options.only(&secrets).unwrap_or_else(|e| refuse(e));
    } else {
        options.only(&[]).unwrap_or_else(|e| refuse(e));
    }
}

/// What an event naming backend `name` must pass when it is written: a server of the
/// `broadcaster` wrapper by that name (else ERROR 42704), on which the writing role has USAGE
/// (else ERROR 42501: naming a backend routes an event to it).
pub fn check_backend_use(name: &str) {
    let Some(server) = pg::broadcaster_server(name) else {
        no_backend(name);
    };
    if !pg::may_use_server(server) {
        Error::BackendNotPermitted(name.to_string()).raise("broadcaster_outbox_accept");
    }
}

fn no_backend(name: &str) -> ! {
    Error::UnknownBackend(name.to_string()).raise("broadcaster_outbox_accept")
}

fn health_timeout_us() -> i64 {
    i64::try_from(guc::health_timeout().as_micros()).unwrap_or(i64::MAX)
}

/// Whether events are flowing from this database: its default backend's relay runs and reached
/// its broker within `broadcaster.health_timeout`, and so did the relay of every named backend
/// that has pending events; and no event names a backend whose server was dropped. Reads what
/// the relays keep in shared memory: never raises, never waits.
#[pg_extern(volatile, parallel_safe)]
fn broadcaster_health() -> bool {
    let timeout_us = health_timeout_us();
    let relays = shared::relays_of(pg::my_database());
    let default = relays.iter().find(|r| r.server == 0);
    default.is_some_and(|r| r.healthy(timeout_us) && !r.pending)
        && relays
            .iter()
            .filter(|r| r.server != 0)
            .all(|r| !r.pending || r.healthy(timeout_us))
}

/// Whether backend `backend` of this database is healthy: its relay runs and reached its broker
/// within `broadcaster.health_timeout`. NULL: the default backend. A name with no server of
/// the `broadcaster` wrapper: ERROR 42704.
#[pg_extern(volatile, parallel_safe, name = "broadcaster_health")]
fn broadcaster_health_of(backend: Option<&str>) -> bool {
    let timeout_us = health_timeout_us();
    if let Some(name) = backend {
        let known = pg::broadcaster_server(name).is_some();
        if !known {
            no_backend(name);
        }
    }
    shared::relays_of(pg::my_database())
        .iter()
        .any(|r| r.backend().as_deref() == backend && r.healthy(timeout_us))
}
