//! A cluster's life around the relay: pg_upgrade, dump and restore, a standby and its promotion,
//! logical replication, workers terminated, databases dropped, renamed, cloned, closed or
//! invalid, a read-only primary, signals during a drain, DROP EXTENSION. Each scenario compares
//! the ids it committed with the `ce_id`s in the stream: produced / delivered / duplicates / lost.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    backends, lines_with, wait_backend, wait_for, Cluster, PgClient, Redis, Setup, Tally, DEADLINE,
    DEFAULT_STREAM,
};

const APP_STREAM: &str = "broadcaster:app";
const RELAY: &str = "broadcaster relay";
const LAUNCHER: &str = "broadcaster launcher";

/// Short waits everywhere, so that an outage or a failed attempt costs about a second.
const FAST: [(&str, &str); 3] = [
    ("broadcaster.poll_interval", "200ms"),
    ("broadcaster.retry_max_delay", "1s"),
    ("broadcaster.network_timeout", "1s"),
];

/// [`FAST`] and `more`.
fn fast_and<'a>(more: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    FAST.iter().chain(more).copied().collect()
}

/// Serving `app` only, retaining delivered events for an hour, dead at the first refusal.
const APP_RETAINED: [(&str, &str); 3] = [
    ("broadcaster.database", "app"),
    ("broadcaster.retention", "1h"),
    ("broadcaster.max_attempts", "1"),
];

/// Commits `n` events in one INSERT and returns their ids.
fn publish_many(c: &mut PgClient, n: i64, ty: &str) -> Vec<String> {
    c.query(
        "INSERT INTO broadcaster_outbox (type, data) \
         SELECT $2, json_build_object('n', g) FROM generate_series(1, $1::bigint) g \
         RETURNING id::text",
        &[&n, &ty],
    )
    .expect("insert events")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

fn publish_one(c: &mut PgClient, ty: &str) -> String {
    c.query_one("SELECT broadcaster_publish($1)::text", &[&ty])
        .expect("publish")
        .get(0)
}

fn count(c: &mut PgClient, sql: &str) -> i64 {
    c.query_one(sql, &[])
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// An event whose stream key holds a string, dead at its first refusal (the cluster runs with
/// `broadcaster.max_attempts = 1`): returns its id once `broadcaster_dead_events` lists it.
fn dead_event(redis: &Redis, c: &mut PgClient) -> String {
    redis.set_string("poisoned");
    let id: String = c
        .query_one(
            "SELECT broadcaster_publish('doomed', stream => 'poisoned')::text",
            &[],
        )
        .expect("publish")
        .get(0);
    wait_for("the dead event", DEADLINE, || {
        c.query_opt(
            "SELECT 1 FROM broadcaster_dead_events WHERE id::text = $1",
            &[&id],
        )
        .ok()
        .flatten()
    });
    id
}

fn dead_ids(c: &mut PgClient) -> Vec<String> {
    c.query("SELECT id::text FROM broadcaster_dead_events", &[])
        .expect("dead events")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Creates database `app` and the extension in it.
fn create_app(cluster: &Cluster) {
    cluster
        .connect()
        .batch_execute("CREATE DATABASE app")
        .expect("CREATE DATABASE app");
    cluster
        .connect_to("app")
        .batch_execute("CREATE EXTENSION broadcaster")
        .expect("CREATE EXTENSION");
}

/// `n` events of `app` delivered and retained: returns their ids.
fn retained_events(cluster: &Cluster, redis: &Redis, n: i64) -> Vec<String> {
    let mut app = cluster.connect_to("app");
    let ids = publish_many(&mut app, n, "retained");
    let got = redis.wait_for_ids(APP_STREAM, &ids, DEADLINE);
    Tally::count(&ids, &got).assert_exactly_once("retained events");
    wait_for("delivered events retained", DEADLINE, || {
        (count(&mut app, "SELECT count(*) FROM broadcaster_published") == n).then_some(())
    });
    ids
}

/// Checks what the servers pg_upgrade started logged: no relay ran in them, and broadcaster
/// said at most once per server start that it stood aside for the binary upgrade.
fn check_upgrade_server_log(log: &str) {
    let starts = lines_with(log, "starting PostgreSQL").len();
    assert!(starts >= 2, "pg_upgrade started its servers:\n{log}");
    let standing_aside: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("broadcaster") && l.to_lowercase().contains("binary upgrade"))
        .collect();
    assert!(
        standing_aside.len() <= starts,
        "{} lines about the binary upgrade for {starts} server starts:\n{}",
        standing_aside.len(),
        standing_aside.join("\n")
    );
    println!(
        "pg_upgrade's servers: {starts} starts, {} lines about the binary upgrade",
        standing_aside.len()
    );
    // log_line_prefix is '%m [%p] %b ': a relay's own lines carry its backend type.
    let relay_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&format!("] {RELAY} ")) || l.contains("relay worker serving"))
        .collect();
    assert!(
        relay_lines.is_empty(),
        "a relay ran inside pg_upgrade:\n{}",
        relay_lines.join("\n")
    );
}

/// Stops `old` (fast), runs the real pg_upgrade into a new cluster configured alike, asserts it
/// succeeded and what its servers logged, and starts the new cluster.
fn upgrade(old: &Cluster) -> Cluster {
    old.stop_server("fast");
    let new = old.init_like();
    let started = Instant::now();
    let run = new.upgrade_from(old);
    let server_log = new.upgrade_server_log();
    assert!(
        run.success,
        "pg_upgrade failed: {run}\n--- pg_upgrade's server log ---\n{server_log}"
    );
    println!("pg_upgrade took {:?}", started.elapsed());
    check_upgrade_server_log(&server_log);
    new.start_server();
    new
}

#[test]
fn pg_upgrade_keeps_every_pending_failing_dead_and_retained_event() {
    let redis = Redis::start();
    let old = Cluster::start(&redis.url(), &fast_and(&APP_RETAINED));
    create_app(&old);
    let retained = retained_events(&old, &redis, 20);
    let dead = dead_event(&redis, &mut old.connect_to("app"));
    redis.pause_writes();
    let pending = publish_many(&mut old.connect_to("app"), 100, "pending");

    let new = upgrade(&old);
    let mut app = new.connect_to("app");
    assert_eq!(
        count(&mut app, "SELECT count(*) FROM broadcaster_published"),
        20,
        "retained events survive pg_upgrade"
    );
    assert_eq!(
        dead_ids(&mut app),
        std::slice::from_ref(&dead),
        "the dead event survives"
    );
    redis.unpause();
    let produced: Vec<String> = retained.iter().chain(&pending).cloned().collect();
    let delivered = redis.wait_for_ids(APP_STREAM, &produced, DEADLINE);
    Tally::count(&produced, &delivered).assert_exactly_once("pg_upgrade, database app");
    assert_eq!(dead_ids(&mut app), [dead], "still dead after the drain");
    assert_eq!(
        count(&mut app, "SELECT count(*) FROM broadcaster_outbox"),
        1,
        "only the dead event is left"
    );
}

#[test]
fn pg_upgrade_succeeds_while_the_postgres_database_is_served() {
    // The default broadcaster.database: pg_upgrade drops and recreates `postgres` in the new
    // cluster, which a relay connected to it would block.
    let Setup { redis, cluster } = Setup::new(&FAST);
    let mut c = cluster.connect();
    let delivered_before = publish_many(&mut c, 3, "before");
    let got = redis.wait_for_ids(DEFAULT_STREAM, &delivered_before, DEADLINE);
    Tally::count(&delivered_before, &got).assert_exactly_once("before pg_upgrade");
    redis.pause_writes();
    let pending = publish_many(&mut c, 5, "pending");
    drop(c);

    let new = upgrade(&cluster);
    redis.unpause();
    let produced: Vec<String> = delivered_before.iter().chain(&pending).cloned().collect();
    let delivered = redis.wait_for_ids(DEFAULT_STREAM, &produced, DEADLINE);
    Tally::count(&produced, &delivered).assert_exactly_once("pg_upgrade, database postgres");
    new.wait_healthy(true, DEADLINE);
}

#[test]
fn pg_dump_and_pg_restore_bring_back_undelivered_events_and_their_seq() {
    let redis = Redis::start();
    let settings = fast_and(&APP_RETAINED);
    let first = Cluster::start(&redis.url(), &settings);
    create_app(&first);
    let retained = retained_events(&first, &redis, 50);
    let dead = dead_event(&redis, &mut first.connect_to("app"));
    redis.pause_writes();
    let pending = publish_many(&mut first.connect_to("app"), 500, "pending");

    let dump = first.file("app.dump").to_string_lossy().into_owned();
    let port = first.port.to_string();
    let run = first.run_tool(
        "pg_dump",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "-Fc",
            "-d",
            "app",
            "-f",
            &dump,
        ],
    );
    assert!(run.success, "pg_dump failed: {run}");
    first.stop_server("fast");

    let second = Cluster::start(&redis.url(), &settings);
    second
        .connect()
        .batch_execute("CREATE DATABASE app")
        .expect("CREATE DATABASE app");
    let port = second.port.to_string();
    let run = second.run_tool(
        "pg_restore",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "-d",
            "app",
            &dump,
        ],
    );
    assert!(run.success, "pg_restore failed: {run}");

    // Redis is still paused: whatever the new relay claims can't leave, nor be deleted.
    let mut app = second.connect_to("app");
    assert_eq!(
        count(&mut app, "SELECT count(*) FROM broadcaster_outbox"),
        501,
        "500 pending and 1 dead event restored"
    );
    assert_eq!(
        count(&mut app, "SELECT count(*) FROM broadcaster_published"),
        50,
        "retained events restored"
    );
    let failures: Vec<String> = app
        .query(
            "SELECT f.seq || ' dead=' || f.dead || ' id=' || coalesce(o.id::text, '(no row)') \
               FROM broadcaster_failures f LEFT JOIN broadcaster_outbox o USING (seq)",
            &[],
        )
        .expect("failures")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        dead_ids(&mut app),
        std::slice::from_ref(&dead),
        "the dead event restored dead; broadcaster_failures: {failures:?}"
    );
    let restored_max = count(
        &mut app,
        "SELECT greatest((SELECT max(seq) FROM broadcaster_outbox), \
                         (SELECT max(seq) FROM broadcaster_published), \
                         (SELECT max(seq) FROM broadcaster_failures))",
    );

    redis.unpause();
    let produced: Vec<String> = retained.iter().chain(&pending).cloned().collect();
    let delivered = redis.wait_for_ids(APP_STREAM, &produced, DEADLINE);
    Tally::count(&produced, &delivered).assert_exactly_once("pg_dump and pg_restore");

    let row = app
        .query_one(
            "INSERT INTO broadcaster_outbox (type) VALUES ('after.restore') RETURNING seq, id::text",
            &[],
        )
        .expect("publish after the restore");
    let (seq, id): (i64, String) = (row.get(0), row.get(1));
    assert!(
        seq > restored_max,
        "a new event's seq {seq} must follow every restored seq (up to {restored_max})"
    );
    let produced: Vec<String> = produced.into_iter().chain([id]).collect();
    let delivered = redis.wait_for_ids(APP_STREAM, &produced, DEADLINE);
    Tally::count(&produced, &delivered).assert_exactly_once("after the restore");
    assert_eq!(dead_ids(&mut app), [dead]);
}

#[test]
fn terminated_launcher_and_relay_come_back() {
    let Setup { redis, cluster } = Setup::new(&FAST);
    let mut c = cluster.connect();
    let first = publish_one(&mut c, "before");
    redis.wait_for_ids(DEFAULT_STREAM, std::slice::from_ref(&first), DEADLINE);
    let launcher = wait_backend(&mut c, LAUNCHER, None, None, DEADLINE);

    let offset = cluster.log_len();
    let terminated = c
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
              WHERE backend_type = 'broadcaster launcher'",
            &[],
        )
        .expect("terminate the launcher");
    assert_eq!(terminated.len(), 1);
    let new_launcher = wait_backend(
        &mut c,
        LAUNCHER,
        None,
        Some(launcher),
        Duration::from_secs(15),
    );
    assert_ne!(new_launcher, launcher);
    wait_for(
        "the log to say the launcher stopped",
        Duration::from_secs(5),
        || {
            cluster
                .log_since(offset)
                .contains("broadcaster: launcher")
                .then_some(())
        },
    );

    let relay = wait_backend(&mut c, RELAY, Some("postgres"), None, DEADLINE);
    let terminated: bool = c
        .query_one("SELECT pg_terminate_backend($1)", &[&relay])
        .expect("terminate the relay")
        .get(0);
    assert!(terminated);
    let new_relay = wait_backend(
        &mut c,
        RELAY,
        Some("postgres"),
        Some(relay),
        Duration::from_secs(15),
    );
    assert_ne!(new_relay, relay);
    let after = publish_one(&mut c, "after");
    let produced = [first, after];
    let delivered = redis.wait_for_ids(DEFAULT_STREAM, &produced, Duration::from_secs(15));
    Tally::count(&produced, &delivered).assert_exactly_once("launcher and relay terminated");
}

#[test]
fn a_database_without_the_extension_is_not_held() {
    let redis = Redis::start();
    let cluster = Cluster::start(&redis.url(), &[]);
    // Connected elsewhere: `postgres` is the template about to be copied.
    let mut c = cluster.connect_to("template1");
    std::thread::sleep(Duration::from_secs(3));
    // Refused after 5 s if a relay sat connected to postgres.
    c.batch_execute("CREATE DATABASE c TEMPLATE postgres")
        .unwrap_or_else(|e| panic!("CREATE DATABASE c TEMPLATE postgres: {e}"));

    let mut seen = 0;
    for _ in 0..20 {
        if backends(&mut c, RELAY)
            .iter()
            .any(|(_, db)| db.as_deref() == Some("postgres"))
        {
            seen += 1;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // A probe every 10 s lasts milliseconds: seen in one sample at most, by chance.
    assert!(
        seen <= 2,
        "a relay sat connected to postgres in {seen} of 20 samples"
    );

    let mut pg = cluster.connect();
    pg.batch_execute("CREATE EXTENSION broadcaster")
        .expect("CREATE EXTENSION");
    let id = publish_one(&mut pg, "first");
    // Well within the launcher's 10 s re-check: the CREATE EXTENSION's commit started it.
    let delivered = redis.wait_for_ids(
        DEFAULT_STREAM,
        std::slice::from_ref(&id),
        Duration::from_secs(8),
    );
    Tally::count(&[id], &delivered).assert_exactly_once("after CREATE EXTENSION");
    let waiting = lines_with(
        &cluster.log(),
        "waiting for CREATE EXTENSION broadcaster in database \"postgres\"",
    )
    .len();
    assert!(waiting <= 1, "said {waiting} times that it waits");
}

/// Publishes one event in `db` (over a connection closed again at once), waits for it in
/// `APP_STREAM` with every event before it, then until no client is left on `db` and a relay is
/// connected to it: ready for a command that needs `db` to itself.
fn publish_in_app_and_see_it(
    cluster: &Cluster,
    redis: &Redis,
    admin: &mut PgClient,
    produced: &mut Vec<String>,
    name: &str,
) {
    let id = publish_one(&mut cluster.connect_to("app"), name);
    produced.push(id);
    let delivered = redis.wait_for_ids(APP_STREAM, produced, DEADLINE);
    Tally::count(produced, &delivered).assert_exactly_once(name);
    wait_for("no client left on app", DEADLINE, || {
        backends(admin, "client backend")
            .iter()
            .all(|(_, db)| db.as_deref() != Some("app"))
            .then_some(())
    });
    wait_backend(admin, RELAY, Some("app"), None, DEADLINE);
}

/// Runs `sql`, which must succeed at the first try and well within the 5 s PostgreSQL waits for
/// other sessions to leave a database.
/// Runs `sql`, which PostgreSQL refuses after 5 s while another process (a relay) is connected
/// to the database it names: success is the proof that the relay stepped aside.
fn at_once(c: &mut PgClient, sql: &str) {
    let started = Instant::now();
    c.batch_execute(sql)
        .unwrap_or_else(|e| panic!("{sql} failed: {e}"));
    println!("{sql}: {:?}", started.elapsed());
}

#[test]
fn served_databases_can_be_dropped_renamed_and_cloned() {
    let redis = Redis::start();
    // app_copy is listed too: a clone that is served says so.
    let cluster = Cluster::start(
        &redis.url(),
        &fast_and(&[("broadcaster.database", "app, app_copy")]),
    );
    create_app(&cluster);
    let mut admin = cluster.connect();
    let mut produced = Vec::new();
    publish_in_app_and_see_it(&cluster, &redis, &mut admin, &mut produced, "flowing");

    // (a) Cloned; its relay says it serves a copy.
    at_once(&mut admin, "CREATE DATABASE app_copy TEMPLATE app");
    wait_for("the copy's warning", Duration::from_secs(30), || {
        cluster
            .log()
            .contains("database \"app_copy\" is a copy of another database")
            .then_some(())
    });
    publish_in_app_and_see_it(
        &cluster,
        &redis,
        &mut admin,
        &mut produced,
        "after the clone",
    );

    // (b) Renamed away and back.
    at_once(&mut admin, "ALTER DATABASE app RENAME TO app_old");
    std::thread::sleep(Duration::from_secs(3));
    let on_old: Vec<i32> = backends(&mut admin, RELAY)
        .into_iter()
        .filter(|(_, db)| db.as_deref() == Some("app_old"))
        .map(|(pid, _)| pid)
        .collect();
    assert!(
        on_old.is_empty(),
        "relays {on_old:?} serve app_old, which broadcaster.database does not name"
    );
    at_once(&mut admin, "ALTER DATABASE app_old RENAME TO app");
    publish_in_app_and_see_it(&cluster, &redis, &mut admin, &mut produced, "renamed back");

    // A rename inside a transaction block: the relay stays away until the COMMIT, then the
    // launcher finds the database under its committed name.
    admin
        .batch_execute("BEGIN; ALTER DATABASE app RENAME TO app_tx; COMMIT")
        .expect("rename in a transaction block");
    std::thread::sleep(Duration::from_secs(3));
    let on_tx: Vec<i32> = backends(&mut admin, RELAY)
        .into_iter()
        .filter(|(_, db)| db.as_deref() == Some("app_tx"))
        .map(|(pid, _)| pid)
        .collect();
    assert!(on_tx.is_empty(), "relays {on_tx:?} serve app_tx");
    at_once(&mut admin, "ALTER DATABASE app_tx RENAME TO app");
    publish_in_app_and_see_it(
        &cluster,
        &redis,
        &mut admin,
        &mut produced,
        "renamed back again",
    );

    // Moved to another tablespace, which also needs the database alone.
    let location = format!("/tmp/bc-ts-{}", std::process::id());
    let _ = std::fs::remove_dir_all(&location);
    std::fs::create_dir_all(&location).expect("tablespace dir");
    let _ = std::process::Command::new("chown")
        .args(["postgres", &location])
        .status();
    admin
        .batch_execute(&format!("CREATE TABLESPACE moved LOCATION '{location}'"))
        .expect("tablespace");
    at_once(&mut admin, "ALTER DATABASE app SET TABLESPACE moved");
    publish_in_app_and_see_it(&cluster, &redis, &mut admin, &mut produced, "moved");
    // CREATE DATABASE ... TEMPLATE DEFAULT (template1) still works with the hook in place.
    at_once(&mut admin, "CREATE DATABASE plain TEMPLATE DEFAULT");

    // (c) Dropped.
    let offset = cluster.log_len();
    at_once(&mut admin, "DROP DATABASE app");
    wait_for(
        "the launcher to wait for app again",
        Duration::from_secs(15),
        || {
            cluster
                .log_since(offset)
                .contains("waiting for database \"app\" to exist")
                .then_some(())
        },
    );
    admin
        .batch_execute("DROP TABLESPACE moved")
        .expect("drop tablespace");
    let _ = std::fs::remove_dir_all(&location);
}

/// FATAL lines of `log`, but for those of relays terminated by the test itself.
fn unexpected_fatals(log: &str) -> Vec<&str> {
    lines_with(log, "FATAL:")
        .into_iter()
        .filter(|l| !l.contains("due to administrator command"))
        .collect()
}

#[test]
fn closed_or_invalid_databases_make_no_crash_loop() {
    let redis = Redis::start();
    let cluster = Cluster::start(&redis.url(), &fast_and(&[("broadcaster.database", "app")]));
    create_app(&cluster);
    let mut admin = cluster.connect();
    let mut produced = Vec::new();
    publish_in_app_and_see_it(&cluster, &redis, &mut admin, &mut produced, "flowing");

    // Closed to connections; then invalid, as an interrupted DROP DATABASE leaves it.
    for (close, open, said, what) in [
        (
            "ALTER DATABASE app ALLOW_CONNECTIONS false",
            "ALTER DATABASE app ALLOW_CONNECTIONS true",
            "does not allow connections",
            "reopened",
        ),
        (
            "UPDATE pg_database SET datconnlimit = -2 WHERE datname = 'app'",
            "UPDATE pg_database SET datconnlimit = -1 WHERE datname = 'app'",
            "is invalid",
            "valid again",
        ),
    ] {
        let relay = wait_backend(&mut admin, RELAY, Some("app"), None, DEADLINE);
        let offset = cluster.log_len();
        admin.batch_execute(close).expect(close);
        admin
            .query_one("SELECT pg_terminate_backend($1)", &[&relay])
            .expect("terminate the relay");
        std::thread::sleep(Duration::from_secs(6));
        let log = cluster.log_since(offset);
        let fatals = unexpected_fatals(&log);
        assert!(fatals.len() <= 1, "crash loop:\n{}", fatals.join("\n"));
        let lines = lines_with(&log, said);
        assert_eq!(lines.len(), 1, "said so once: {lines:?}\n{log}");
        admin.batch_execute(open).expect(open);
        publish_in_app_and_see_it(&cluster, &redis, &mut admin, &mut produced, what);
    }
}

/// `(state, last_error)` of the relay of `postgres` in broadcaster_status.
fn postgres_status(c: &mut PgClient) -> Option<(String, Option<String>)> {
    c.query_opt(
        "SELECT state, last_error FROM broadcaster_status WHERE database = 'postgres'",
        &[],
    )
    .expect("broadcaster_status")
    .map(|r| (r.get(0), r.get(1)))
}

#[test]
fn a_read_only_primary_makes_the_relay_wait_and_resume() {
    let Setup { redis, cluster } = Setup::new(&FAST);
    let mut c = cluster.connect();
    let relay = wait_backend(&mut c, RELAY, Some("postgres"), None, DEADLINE);
    redis.pause_writes();
    let ids = publish_many(&mut c, 50, "held");

    let offset = cluster.log_len();
    cluster.set_and_reload("default_transaction_read_only", "on");
    // Once the relay says so, it has read the setting: no claim it began before is in flight.
    wait_for(
        "the relay to report 'read only'",
        Duration::from_secs(15),
        || {
            postgres_status(&mut c)
                .filter(|(state, _)| state == "read only")
                .map(drop)
        },
    );
    redis.unpause();
    let window = Instant::now();
    while window.elapsed() < Duration::from_secs(5) {
        assert_eq!(
            redis.len(DEFAULT_STREAM),
            0,
            "sent what it could not delete"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (state, error) = postgres_status(&mut c).expect("a status row");
    assert_eq!(state, "read only");
    let error = error.unwrap_or_default();
    assert!(error.contains("read-only"), "last_error: {error}");
    let healthy: bool = c
        .query_one("SELECT broadcaster_health()", &[])
        .expect("health")
        .get(0);
    assert!(!healthy, "healthy while nothing can be relayed");
    let log = cluster.log_since(offset);
    let said = lines_with(&log, "read-only");
    assert!(
        said.len() <= 2,
        "{} lines:\n{}",
        said.len(),
        said.join("\n")
    );
    assert_eq!(
        wait_backend(&mut c, RELAY, Some("postgres"), None, DEADLINE),
        relay,
        "the relay was restarted"
    );

    // ALTER SYSTEM is allowed in a read-only transaction; turning it off first is harmless.
    c.batch_execute("SET default_transaction_read_only = off")
        .expect("SET");
    c.batch_execute("ALTER SYSTEM RESET default_transaction_read_only")
        .expect("ALTER SYSTEM RESET");
    c.batch_execute("SELECT pg_reload_conf()").expect("reload");
    let delivered = redis.wait_for_ids(DEFAULT_STREAM, &ids, DEADLINE);
    Tally::count(&ids, &delivered).assert_exactly_once("read-only primary");
}

#[test]
fn a_standby_runs_no_relay_and_its_promotion_drains_the_outbox() {
    let Setup { redis, cluster } = Setup::new(&FAST);
    let mut primary = cluster.connect();
    redis.pause_writes();
    let ids = publish_many(&mut primary, 100, "before.promotion");
    drop(primary);

    let standby = cluster.start_standby();
    let mut s = standby.connect();
    wait_for("the standby to replay the outbox", DEADLINE, || {
        (count(&mut s, "SELECT count(*) FROM broadcaster_outbox") == 100).then_some(())
    });
    for ty in [RELAY, LAUNCHER] {
        let running = backends(&mut s, ty);
        assert!(running.is_empty(), "{ty} on the standby: {running:?}");
    }
    let rows: Vec<(String, String)> = s
        .query("SELECT database::text, state FROM broadcaster_status", &[])
        .expect("broadcaster_status on a standby")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(
        rows.iter().any(|(db, _)| db == "postgres"),
        "a row for postgres: {rows:?}"
    );
    assert!(
        rows.iter().all(|(_, state)| state == "standby"),
        "states: {rows:?}"
    );
    let healthy: bool = s
        .query_one("SELECT broadcaster_health()", &[])
        .expect("broadcaster_health() on a standby")
        .get(0);
    assert!(!healthy);

    cluster.stop_server("immediate");
    standby.promote();
    redis.unpause();
    let mut s = standby.connect();
    wait_backend(
        &mut s,
        RELAY,
        Some("postgres"),
        None,
        Duration::from_secs(15),
    );
    let delivered = redis.wait_for_ids(DEFAULT_STREAM, &ids, Duration::from_secs(30));
    Tally::count(&ids, &delivered).assert_exactly_once("standby promoted");
}

#[test]
fn signals_never_cause_a_resend() {
    // A long network_timeout: the relay's first XADD waits out the pause instead of timing out
    // into an outage, so any outage message comes from a signal.
    let Setup { redis, cluster } = Setup::new(&[
        ("broadcaster.batch_size", "200"),
        ("broadcaster.poll_interval", "200ms"),
        ("broadcaster.retry_max_delay", "1s"),
        ("broadcaster.network_timeout", "60s"),
    ]);
    let mut c = cluster.connect();
    redis.pause_writes();
    let mut ids = Vec::with_capacity(200_000);
    for _ in 0..4 {
        ids.extend(publish_many(&mut c, 50_000, "signalled"));
    }

    let offset = cluster.log_len();
    redis.unpause();
    let stop = Arc::new(AtomicBool::new(false));
    let mut signaller = cluster.connect();
    let signals = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(120) {
                signaller
                    .batch_execute(&format!("CREATE DATABASE sig_tmp_{n}"))
                    .expect("CREATE DATABASE");
                signaller
                    .batch_execute(&format!("DROP DATABASE sig_tmp_{n}"))
                    .expect("DROP DATABASE");
                signaller
                    .batch_execute("SELECT pg_reload_conf()")
                    .expect("reload");
                n += 1;
            }
            n
        })
    };
    // And SIGUSR1, what every barrier and wake-up sends, straight at the relay every few
    // milliseconds: the rounds above are too far apart to land often in a socket read.
    let relay = cluster.worker_pid();
    let barrages = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(120) {
                let sent = std::process::Command::new("kill")
                    .args(["-USR1", &relay.to_string()])
                    .status()
                    .is_ok_and(|s| s.success());
                n += u32::from(sent);
                std::thread::sleep(Duration::from_millis(3));
            }
            n
        })
    };
    wait_for("the drain", Duration::from_secs(150), || {
        (redis.len(DEFAULT_STREAM) >= ids.len()
            && count(&mut c, "SELECT count(*) FROM broadcaster_outbox") == 0)
            .then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    let rounds = signals.join().expect("signal thread");
    let usr1 = barrages.join().expect("SIGUSR1 thread");
    println!(
        "{rounds} rounds of CREATE/DROP DATABASE and reload, {usr1} SIGUSR1 to the relay, during the drain"
    );
    assert!(rounds >= 1, "no signal landed during the drain");
    assert!(usr1 >= 100, "only {usr1} SIGUSR1 reached the relay");

    let delivered = redis.event_ids(DEFAULT_STREAM);
    Tally::count(&ids, &delivered).assert_exactly_once("signals during a drain");
    let log = cluster.log_since(offset);
    let retries = lines_with(&log, "retrying in");
    assert!(
        retries.is_empty(),
        "outage back-off during the drain:\n{}",
        retries.join("\n")
    );
}

#[test]
fn logical_replication_never_publishes_an_event_twice() {
    // Every table of the extension published, and a subscriber that writes events of its own
    // (held back by its own paused Redis): the publisher's inserts, deletes and failures share
    // seqs with the subscriber's events, and must not touch them.
    let redis = Redis::start();
    let sub_redis = Redis::start();
    let publisher = Cluster::start(&redis.url(), &fast_and(&[("wal_level", "logical")]));
    let subscriber = Cluster::start(&sub_redis.url(), &FAST);
    let mut p = publisher.connect();
    p.batch_execute("CREATE EXTENSION broadcaster")
        .expect("extension on the publisher");
    p.batch_execute("CREATE PUBLICATION p FOR ALL TABLES")
        .expect("publication");
    let mut s = subscriber.connect();
    s.batch_execute("CREATE EXTENSION broadcaster")
        .expect("extension on the subscriber");
    sub_redis.pause_writes();
    let local = publish_many(&mut s, 30, "local");
    s.batch_execute(&format!(
        "CREATE SUBSCRIPTION s CONNECTION 'host=127.0.0.1 port={} dbname=postgres user=postgres' \
         PUBLICATION p",
        publisher.port
    ))
    .expect("subscription");
    wait_for("every table to be synchronized", DEADLINE, || {
        let ready = count(
            &mut s,
            "SELECT count(*) FROM pg_subscription_rel WHERE srsubstate = 'r'",
        );
        let all = count(&mut s, "SELECT count(*) FROM pg_subscription_rel");
        (all >= 4 && ready == all).then_some(())
    });

    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.extend(publish_many(&mut p, 50, "replicated"));
    }
    let delivered = redis.wait_for_ids(DEFAULT_STREAM, &ids, DEADLINE);
    Tally::count(&ids, &delivered).assert_exactly_once("logical replication, first look");
    // Everything the publisher did since, its relay's deletes included, reached the subscriber.
    let lsn: String = p
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .expect("lsn")
        .get(0);
    wait_for("the subscriber to receive it all", DEADLINE, || {
        s.query_one(
            "SELECT coalesce(bool_and(received_lsn >= $1::text::pg_lsn), false) \
               FROM pg_stat_subscription",
            &[&lsn],
        )
        .ok()
        .map(|r| r.get::<_, bool>(0))
        .filter(|b| *b)
    });
    std::thread::sleep(Duration::from_secs(3));
    let delivered = redis.event_ids(DEFAULT_STREAM);
    Tally::count(&ids, &delivered).assert_exactly_once("logical replication, 3 s later");
    let kept: Vec<String> = s
        .query("SELECT id::text FROM broadcaster_outbox ORDER BY seq", &[])
        .expect("subscriber's outbox")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        kept, local,
        "the subscriber keeps its own 30 events, and none of the publisher's"
    );
    assert_eq!(
        count(&mut s, "SELECT count(*) FROM broadcaster_failures"),
        0,
        "no failure of the publisher's lands on the subscriber"
    );
    sub_redis.unpause();
    let delivered = sub_redis.wait_for_ids(DEFAULT_STREAM, &local, DEADLINE);
    Tally::count(&local, &delivered).assert_exactly_once("the subscriber's own events");
}

#[test]
fn drop_extension_refuses_while_events_are_undelivered() {
    let Setup { redis, cluster } = Setup::new(&FAST);
    let mut c = cluster.connect();
    // Nothing undelivered: dropped at once.
    at_once(&mut c, "DROP EXTENSION broadcaster");
    c.batch_execute("CREATE EXTENSION broadcaster")
        .expect("CREATE EXTENSION");

    redis.pause_writes();
    publish_many(&mut c, 3, "undelivered");
    let err = c
        .batch_execute("DROP EXTENSION broadcaster")
        .expect_err("DROP EXTENSION must be refused while 3 events are undelivered");
    let db = err.as_db_error().expect("a server error");
    assert_eq!(
        db.code(),
        &postgres::error::SqlState::OBJECT_IN_USE,
        "{db:?}"
    );
    assert!(db.message().contains('3'), "message: {}", db.message());
    assert_eq!(count(&mut c, "SELECT count(*) FROM broadcaster_outbox"), 3);

    c.batch_execute("DELETE FROM broadcaster_outbox")
        .expect("DELETE");
    c.batch_execute("DROP EXTENSION broadcaster")
        .expect("DROP EXTENSION of an empty outbox");
    c.batch_execute("CREATE EXTENSION broadcaster")
        .expect("CREATE EXTENSION again");
    redis.unpause();
    let id = publish_one(&mut c, "after.recreate");
    let delivered = redis.wait_for_ids(DEFAULT_STREAM, std::slice::from_ref(&id), DEADLINE);
    Tally::count(&[id], &delivered).assert_exactly_once("after DROP and CREATE EXTENSION");
    let log = cluster.log();
    let relay_errors: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains(&format!("] {RELAY} ")) && (l.contains("ERROR:") || l.contains("FATAL:"))
        })
        .collect();
    assert!(
        relay_errors.len() <= 2,
        "the relay's errors:\n{}",
        relay_errors.join("\n")
    );
}
