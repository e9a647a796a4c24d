//! Upgrading the extension with events in flight: a database created at 0.1.0 (its frozen
//! install script, `sql/released/`) holds pending, dead and retained events while this library
//! serves it, the cluster restarts, `ALTER EXTENSION broadcaster UPDATE` runs the hand-written
//! `sql/broadcaster--0.1.0--0.2.0.sql`: every event is relayed once, and the schema equals a
//! fresh install's (`pg_dump --schema-only --binary-upgrade` of both, which lists every object
//! of the extension, compared).

mod common;

use std::process::Command;

use common::{Cluster, Redis, Tally, DEADLINE, DEFAULT_STREAM};

/// Puts the frozen 0.1.0 install script where `CREATE EXTENSION ... VERSION '0.1.0'` finds it.
fn install_released_0_1_0() {
    let pg_config = std::env::var("PG_CONFIG")
        .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin/pg_config".into());
    let out = Command::new(&pg_config)
        .arg("--sharedir")
        .output()
        .expect("pg_config");
    let sharedir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/sql/released/broadcaster--0.1.0.sql"
        ),
        format!("{sharedir}/extension/broadcaster--0.1.0.sql"),
    )
    .expect("copy the 0.1.0 script (the tests run as root, as scripts/test.sh does)");
    // 0.1.0's control file named the library `$libdir/broadcaster`: a secondary control file
    // makes a 0.1.0 install here what a real one is.
    std::fs::write(
        format!("{sharedir}/extension/broadcaster--0.1.0.control"),
        "module_pathname = '$libdir/broadcaster'\n",
    )
    .expect("write the 0.1.0 control file");
}

/// The libraries the extension's C functions name (`probin`), distinct, comma-separated.
fn libraries_of(c: &mut common::PgClient) -> String {
    c.query_one(
        "SELECT string_agg(DISTINCT probin, ',') FROM pg_proc WHERE proname LIKE 'broadcaster%' AND probin IS NOT NULL",
        &[],
    )
    .expect("probin")
    .get(0)
}

/// Events a cluster holds when it is upgraded: 20 delivered and retained, one dead, and 100
/// pending behind a Redis that refuses writes (left paused).
struct InFlight {
    retained: Vec<String>,
    dead: String,
    pending: Vec<String>,
}

/// One event of type `ty` (to `stream`), its id; through a call 0.1.0's SQL takes too.
fn publish(c: &mut common::PgClient, ty: &str, stream: Option<&str>) -> String {
    c.query_one(
        "SELECT broadcaster_publish($1, '{\"v\": 1}', stream => $2)::text",
        &[&ty, &stream],
    )
    .expect("publish")
    .get(0)
}

fn put_events_in_flight(c: &mut common::PgClient, redis: &Redis, when: &str) -> InFlight {
    let retained: Vec<String> = (0..20).map(|_| publish(c, "before", None)).collect();
    let delivered = redis.wait_for_ids(DEFAULT_STREAM, &retained, DEADLINE);
    Tally::count(&retained, &delivered).assert_exactly_once(when);
    redis.set_string("poisoned");
    let dead = publish(c, "dead", Some("poisoned"));
    common::wait_for("the dead event", DEADLINE, || {
        let n: i64 = c
            .query_one("SELECT count(*) FROM broadcaster_dead_events", &[])
            .ok()?
            .get(0);
        (n == 1).then_some(())
    });
    redis.pause_writes();
    let pending = (0..100).map(|_| publish(c, "pending", None)).collect();
    InFlight {
        retained,
        dead,
        pending,
    }
}

/// After the upgrade, Redis writable again: every event in flight and each of `more` relayed
/// exactly once, the dead one still dead, the retained ones kept.
fn assert_all_came_through(
    c: &mut common::PgClient,
    redis: &Redis,
    in_flight: &InFlight,
    more: &[String],
    what: &str,
) {
    redis.unpause();
    let mut all = in_flight.retained.clone();
    all.extend(in_flight.pending.iter().cloned());
    all.extend(more.iter().cloned());
    let delivered = redis.wait_for_ids(DEFAULT_STREAM, &all, DEADLINE);
    Tally::count(&all, &delivered).assert_exactly_once(what);
    let still_dead: Vec<String> = c
        .query("SELECT id::text FROM broadcaster_dead_events", &[])
        .expect("dead events")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(still_dead, vec![in_flight.dead.clone()], "{what}");
    let kept: i64 = c
        .query_one(
            "SELECT count(*) FROM broadcaster_published WHERE type = 'before'",
            &[],
        )
        .expect("retained")
        .get(0);
    assert_eq!(kept, 20, "{what}");
}

/// The extension's objects in `database`, as `pg_dump --binary-upgrade --schema-only` writes
/// them, statement by statement, without what differs between any two databases (oids, frozen
/// transaction ids, the sequence's position, pg_dump's session token) nor the test build's
/// `tests` schema.
fn extension_schema(cluster: &Cluster, database: &str) -> Vec<String> {
    let port = cluster.port.to_string();
    let dump = cluster.run_tool(
        "pg_dump",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "--schema-only",
            "--binary-upgrade",
            "-d",
            database,
        ],
    );
    assert!(dump.success, "{dump}");
    let text: String = dump
        .stdout
        .lines()
        .filter(|l| !(l.starts_with("--") || l.starts_with('\\')))
        .collect::<Vec<_>>()
        .join("\n");
    let mut statements: Vec<String> = text
        .split(";\n")
        .map(|s| s.trim().to_string())
        .filter(|s| {
            !(s.is_empty()
                || s.starts_with("SET ")
                || s.contains("set_config(")
                || s.contains("binary_upgrade_")
                || s.contains("pg_catalog.setval(")
                || s.contains("relfrozenxid")
                || s.contains("tests.")
                || s.contains("SCHEMA tests"))
        })
        .collect();
    statements.sort();
    statements
}

#[test]
fn alter_extension_update_from_0_1_0_keeps_every_event_and_gives_the_fresh_schema() {
    install_released_0_1_0();
    let redis = Redis::start();
    let cluster = Cluster::start(
        &redis.url(),
        &[
            ("broadcaster.retention", "1h"),
            ("broadcaster.max_attempts", "1"),
            ("broadcaster.poll_interval", "200ms"),
            ("broadcaster.retry_max_delay", "1s"),
        ],
    );
    let mut c = cluster.connect();
    c.batch_execute("CREATE EXTENSION broadcaster VERSION '0.1.0'")
        .expect("0.1.0");
    let libraries = libraries_of(&mut c);
    assert_eq!(libraries, "$libdir/broadcaster", "as a real 0.1.0 install");
    // A producer granted what 0.1.0's README said.
    c.batch_execute(
        "CREATE ROLE app LOGIN; GRANT INSERT ON broadcaster_outbox TO app; \
         GRANT EXECUTE ON FUNCTION broadcaster_publish(text, json, text, text, text, jsonb, text) TO app",
    )
    .expect("0.1.0's grants");

    // This library serves 0.1.0's SQL meanwhile: events flow, status answers.
    let in_flight = put_events_in_flight(&mut c, &redis, "at 0.1.0");
    let states: i64 = c
        .query_one(
            "SELECT count(*) FROM broadcaster_status WHERE state = 'running'",
            &[],
        )
        .expect("0.1.0's status through this library")
        .get(0);
    assert_eq!(states, 1);

    cluster.stop_server("fast");
    cluster.start_server();
    let mut c = cluster.connect();
    c.batch_execute("ALTER EXTENSION broadcaster UPDATE")
        .expect("ALTER EXTENSION UPDATE");
    let version: String = c
        .query_one(
            "SELECT extversion FROM pg_extension WHERE extname = 'broadcaster'",
            &[],
        )
        .expect("version")
        .get(0);
    assert_eq!(version, env!("CARGO_PKG_VERSION"));
    // 0.1.0 named the library `$libdir/broadcaster`: every function now names it as a fresh
    // install does.
    let libraries = libraries_of(&mut c);
    assert_eq!(libraries, "broadcaster");
    // The producer still publishes, whichever overload a call resolves to.
    let mut app = common::PgClient::connect(
        &format!(
            "host=127.0.0.1 port={} user=app dbname=postgres",
            cluster.port
        ),
        postgres::NoTls,
    )
    .expect("app connects");
    let mut by_app = Vec::new();
    for call in [
        "SELECT broadcaster_publish('by.app')::text",
        "SELECT broadcaster_publish('by.app', '{\"untyped\": 1}')::text",
        "SELECT broadcaster_publish('by.app', '{\"json\": 1}'::json)::text",
        "SELECT broadcaster_publish('by.app', jsonb_build_object('jsonb', 1))::text",
    ] {
        let id: String = app
            .query_one(call, &[])
            .unwrap_or_else(|e| panic!("{call} as app after the update: {e}"))
            .get(0);
        by_app.push(id);
    }

    // Every event through the update: pending ones relayed once, the dead one still dead, the
    // retained ones kept; 0.2.0's own surface works.
    let mut more = by_app;
    more.push(publish_jsonb(&mut c));
    assert_all_came_through(
        &mut c,
        &redis,
        &in_flight,
        &more,
        "through ALTER EXTENSION UPDATE",
    );
    let states: Vec<String> = c
        .query("SELECT state FROM broadcaster_status", &[])
        .expect("0.2.0's status")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(states, vec!["running".to_string()]);

    // The same schema as a fresh install (without the test's own grants to app).
    c.batch_execute(
        "REVOKE ALL ON broadcaster_outbox FROM app; \
         REVOKE ALL ON FUNCTION broadcaster_publish(text, text, text, text, text, jsonb, text, text), \
                               broadcaster_publish(text, json, text, text, text, jsonb, text, text), \
                               broadcaster_publish(text, jsonb, text, text, text, jsonb, text, text) FROM app",
    )
    .expect("revoke the test's grants");
    c.batch_execute("CREATE DATABASE fresh").expect("fresh");
    cluster
        .connect_to("fresh")
        .batch_execute("CREATE EXTENSION broadcaster")
        .expect("fresh install");
    let upgraded = extension_schema(&cluster, "postgres");
    let fresh = extension_schema(&cluster, "fresh");
    let only_upgraded: Vec<&String> = upgraded.iter().filter(|l| !fresh.contains(l)).collect();
    let only_fresh: Vec<&String> = fresh.iter().filter(|l| !upgraded.contains(l)).collect();
    assert!(
        upgraded == fresh,
        "the upgraded schema differs from a fresh install's\nonly upgraded:\n{}\nonly fresh:\n{}",
        only_upgraded
            .iter()
            .map(|l| l.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        only_fresh
            .iter()
            .map(|l| l.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
    );
    assert!(
        upgraded.len() > 100,
        "{} lines: the dump lists the extension's objects",
        upgraded.len()
    );
    // And the extension's initial privileges, which decide what pg_dump writes as grants.
    let init_privs = |database: &str| -> Vec<String> {
        cluster
            .connect_to(database)
            .query(
                "SELECT pg_describe_object(classoid, objoid, objsubid) || ' ' || initprivs::text \
                   FROM pg_init_privs i \
                  WHERE EXISTS (SELECT 1 FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid \
                                 WHERE e.extname = 'broadcaster' AND d.deptype = 'e' \
                                   AND d.classid = i.classoid AND d.objid = i.objoid) \
                    AND pg_describe_object(classoid, objoid, objsubid) NOT LIKE '%tests.%' \
                  ORDER BY 1",
                &[],
            )
            .expect("pg_init_privs")
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    assert_eq!(init_privs("postgres"), init_privs("fresh"));
    // And what pg_dump keeps the rows of (the dump above leaves that list out).
    let marked = |database: &str| -> Vec<String> {
        cluster
            .connect_to(database)
            .query(
                "SELECT c::regclass::text FROM pg_extension e, unnest(e.extconfig) c \
                  WHERE e.extname = 'broadcaster' ORDER BY 1",
                &[],
            )
            .expect("extconfig")
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    assert_eq!(marked("postgres"), marked("fresh"));
    assert_eq!(marked("fresh").len(), 5, "{:?}", marked("fresh"));
}

/// An event with jsonb data, 0.2.0's overload.
fn publish_jsonb(c: &mut common::PgClient) -> String {
    c.query_one(
        "SELECT broadcaster_publish('after', jsonb_build_object('v', 2))::text",
        &[],
    )
    .expect("0.2.0's jsonb overload")
    .get(0)
}

/// `pg_upgrade` across major versions, from Debian's PostgreSQL 15 to the 18 build, of a cluster
/// with pending, dead and retained events: the upgrade succeeds and every undelivered event is
/// relayed once after it. Runs where `PG_CONFIG` is an 18 and 15 is installed too, as in
/// `scripts/test.sh`'s pass on 18, whose pass on 15 installed the same build into 15; ignored
/// in a build for another version.
#[test]
#[cfg_attr(
    not(feature = "pg18"),
    ignore = "a pg_upgrade from 15 to 18: runs in the pass on 18"
)]
fn pg_upgrade_from_15_to_18_keeps_every_pending_dead_and_retained_event() {
    let new_bindir = common::pg_bindir();
    let old_bindir = std::path::PathBuf::from("/usr/lib/postgresql/15/bin");
    let version = Command::new(new_bindir.join("postgres"))
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    assert!(
        version.contains(" 18.") && old_bindir.join("postgres").exists(),
        "needs PG_CONFIG at PostgreSQL 18 ({version}) and Debian's 15 installed"
    );
    let redis = Redis::start();
    let settings = [
        ("broadcaster.retention", "1h"),
        ("broadcaster.max_attempts", "1"),
        ("broadcaster.poll_interval", "200ms"),
        ("broadcaster.retry_max_delay", "1s"),
    ];
    let old = Cluster::init_with_binaries(&redis.url(), &settings, old_bindir, &[]);
    old.start_server();
    let mut c = old.connect();
    c.batch_execute("CREATE EXTENSION broadcaster")
        .expect("extension on 15");
    let in_flight = put_events_in_flight(&mut c, &redis, "on 15");
    // Debian 12's 15.20 build stores an attribute option, pg_attver, on every column, which the
    // upstream 18 build refuses when pg_upgrade restores the schema: a quirk of these two
    // builds (any table fails), not of broadcaster. Removed before the upgrade.
    c.batch_execute(
        "UPDATE pg_catalog.pg_attribute \
            SET attoptions = (SELECT array_agg(o) FROM unnest(attoptions) o \
                               WHERE o NOT LIKE 'pg_attver=%') \
          WHERE attoptions::text LIKE '%pg_attver%'",
    )
    .expect("clear Debian's pg_attver");
    drop(c);
    old.stop_server("fast");

    // 18's initdb turns data checksums on by default; 15's cluster has none.
    let new = old.init_like_with_binaries(new_bindir, &["--no-data-checksums"]);
    let run = new.upgrade_from(&old);
    if !run.success {
        // pg_upgrade says which log holds the cause: show their last lines.
        let logs = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "grep -h -B2 -A3 -i \"error\" {}/pg_upgrade_output.d/*/log/pg_upgrade_dump_*.log",
                new.data().display()
            ))
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        panic!("pg_upgrade 15 -> 18 failed:\n{run}\n{logs}");
    }
    new.start_server();
    let mut c = new.connect();
    let server: i32 = c
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .expect("version")
        .get(0);
    assert!(server >= 180_000, "{server}");
    let after = publish(&mut c, "after", None);
    assert_all_came_through(
        &mut c,
        &redis,
        &in_flight,
        &[after],
        "through pg_upgrade 15 -> 18",
    );
}

/// Installed without root, outside PostgreSQL's own directories, as Kubernetes operators do
/// with PostgreSQL 18's `extension_control_path` and `dynamic_library_path`: a copy of the 18
/// build with no broadcaster file in it, the extension's files in a folder of the cluster's
/// user (`<prefix>/lib/broadcaster.so`, `<prefix>/share/extension/broadcaster*`, as
/// `cargo pgrx package` lays them out), preloaded by name, created, and an event relayed.
#[test]
#[cfg_attr(
    not(feature = "pg18"),
    ignore = "extension_control_path is new in PostgreSQL 18: runs in the pass on 18"
)]
fn installs_outside_postgresqls_directories_with_extension_control_path() {
    let bindir = common::pg_bindir();
    // The 18 build's whole folder (scripts/setup.sh: its libraries sit beside pginstall).
    let root = bindir
        .ancestors()
        .nth(3)
        .expect("the 18 build's folder")
        .to_path_buf();
    let scratch = std::path::PathBuf::from(format!("/tmp/bc-ext-path-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).expect("scratch");
    let copy = scratch.join("postgresql");
    // Hard links: a copy in a second, no more disk; a plain copy across filesystems.
    let linked = Command::new("cp")
        .arg("-al")
        .arg(&root)
        .arg(&copy)
        .status()
        .expect("cp");
    if !linked.success() {
        let _ = std::fs::remove_dir_all(&copy);
        let copied = Command::new("cp")
            .arg("-a")
            .arg(&root)
            .arg(&copy)
            .status()
            .expect("cp");
        assert!(copied.success(), "copy {}", root.display());
    }
    let copy_bindir = copy.join(bindir.strip_prefix(&root).expect("bindir under its root"));
    let pg_config = |flag: &str| {
        let out = Command::new(copy_bindir.join("pg_config"))
            .arg(flag)
            .output()
            .expect("pg_config");
        std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    };
    let (pkglibdir, extension_dir) = (
        pg_config("--pkglibdir"),
        pg_config("--sharedir").join("extension"),
    );
    assert!(
        pkglibdir.starts_with(&copy),
        "the build is relocatable: {}",
        pkglibdir.display()
    );
    let prefix = scratch.join("broadcaster");
    std::fs::create_dir_all(prefix.join("lib")).expect("lib");
    std::fs::create_dir_all(prefix.join("share/extension")).expect("share");
    // Copied, then unlinked from the copy: a hard link shares its file with the real install,
    // whose owner the chown below must not change.
    let move_out = |from: std::path::PathBuf, to: std::path::PathBuf| {
        std::fs::copy(&from, &to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
        std::fs::remove_file(&from).expect("unlink from the copy");
    };
    move_out(
        pkglibdir.join("broadcaster.so"),
        prefix.join("lib/broadcaster.so"),
    );
    for entry in std::fs::read_dir(&extension_dir)
        .expect("extension dir")
        .flatten()
    {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with("broadcaster")
        {
            move_out(
                entry.path(),
                prefix.join("share/extension").join(entry.file_name()),
            );
        }
    }
    // The files are the cluster user's, not root's.
    let runas = std::env::var("BROADCASTER_TEST_RUNAS").unwrap_or_else(|_| "postgres".into());
    let _ = Command::new("chown")
        .arg("-R")
        .arg(&runas)
        .arg(&prefix)
        .status();
    let redis = Redis::start();
    let control_path = format!("{}:$system", prefix.join("share").display());
    let library_path = format!("{}:$libdir", prefix.join("lib").display());
    let cluster = Cluster::init_with_binaries(
        &redis.url(),
        &[
            ("extension_control_path", control_path.as_str()),
            ("dynamic_library_path", library_path.as_str()),
            ("broadcaster.poll_interval", "200ms"),
        ],
        copy_bindir,
        &[],
    );
    cluster.start_server();
    let mut c = cluster.connect();
    let available: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_available_extensions WHERE name = 'broadcaster'",
            &[],
        )
        .expect("pg_available_extensions")
        .get(0);
    assert_eq!(available, 1, "found through extension_control_path");
    c.batch_execute("CREATE EXTENSION broadcaster")
        .expect("CREATE EXTENSION from the extension_control_path folder");
    let probin = libraries_of(&mut c);
    assert_eq!(
        probin, "broadcaster",
        "found through dynamic_library_path, not $libdir"
    );
    let id = publish(&mut c, "from.outside", None);
    assert_eq!(
        redis.wait_entries(common::DEFAULT_STREAM, 1)[0].event_id(),
        id
    );
    drop(c);
    drop(cluster);
    let _ = std::fs::remove_dir_all(&scratch);
}
