//! The launcher: a worker connected to no database that starts the relay of each database
//! `broadcaster.database` lists once it exists, accepts connections and has the extension, and
//! starts it again whenever it stops. Each database's relay starts the relays of its named
//! backends (see `relay.rs`).

use std::time::{Duration, Instant};

use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, BgWorkerStartTime,
    DynamicBackgroundWorker, SignalWakeFlags,
};
use pgrx::prelude::*;

use super::RESTART_DELAY;
use crate::pg::{self, Database};
use crate::{guc, shared};

/// How often the launcher looks for the database and at the relay.
const LAUNCHER_CHECK: Duration = Duration::from_secs(1);

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
            pg::reload_configuration();
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
    pg::exit(1);
}

/// Serves the databases `broadcaster.database` lists now: adding one needs only a reload;
/// the relay of a database no longer listed is stopped.
fn follow_settings(relays: &mut Vec<Launched>) {
    let mut listed = guc::databases();
    if listed.is_empty() {
        log!("broadcaster: broadcaster.database is empty; no relay runs");
    }
    if listed.len() > shared::MAX_DATABASES {
        warning!(
            "broadcaster: {} databases listed; only the first {} are served",
            listed.len(),
            shared::MAX_DATABASES
        );
        listed.truncate(shared::MAX_DATABASES);
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
        let database = BackgroundWorker::transaction(|| pg::find_database(&name));
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
        if shared::relay_running(oid, 0) {
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
        match launch_relay(oid, 0) {
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

/// Starts the relay of `database` for its default backend (`server` 0) or for the foreign
/// server `server`. Not restarted by the postmaster: the launcher restarts a database's relay
/// while the database exists, and that relay restarts its servers' relays.
pub fn launch_relay(
    database: pg_sys::Oid,
    server: u32,
) -> Result<DynamicBackgroundWorker, pgrx::bgworkers::DynamicBackgroundWorkerLoadError> {
    BackgroundWorkerBuilder::new("broadcaster relay")
        .set_type("broadcaster relay")
        .set_library("broadcaster")
        .set_function("broadcaster_relay_main")
        .set_argument(Some(pg_sys::Datum::from(database.to_u32())))
        .set_extra(&server.to_string())
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(None)
        .load_dynamic()
}
