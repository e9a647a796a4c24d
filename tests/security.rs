//! Search-path hijacking, played by an attacker. Role `evil` may create objects in `public`,
//! the very schema the extension lives in (its default, and the dangerous case). There it plants
//! overloads with the exact argument types of every operator, function and aggregate the
//! extension's SQL and the relay's SQL use, views named like the catalogs they read and domains
//! named like the types they name; each trap writes `(current_user, what)` into `public.pwned`
//! and `security-trap: <who> ran <what>` into the server log (which no rollback undoes), then
//! returns the real result. The attacker's own probes, with `public` first, prove every trap is
//! armed. Then superusers use every function and view of the extension, with the default
//! search_path and with `public` ahead of `pg_catalog`, while the relay claims, publishes,
//! fails, retires, clears, forgets, purges and replays events; the extension is installed into
//! a schema already holding the traps; and a relay whose database puts `public` first does its
//! whole round. Nothing of the attacker's may run as anyone but the attacker.

mod common;

use std::collections::BTreeMap;
use std::panic::{self, AssertUnwindSafe};

use common::{Cluster, PgClient, Redis, Setup, DEADLINE, DEFAULT_STREAM};
use postgres::types::ToSql;
use postgres::SimpleQueryMessage;

/// Fast retries, two attempts before an event is dead, and retention so that replay has
/// something to send and the relay something to purge.
const SETTINGS: &[(&str, &str)] = &[
    ("broadcaster.poll_interval", "200ms"),
    ("broadcaster.retry_max_delay", "1s"),
    ("broadcaster.max_attempts", "2"),
    ("broadcaster.retention", "1h"),
];

/// A Redis key holding a plain string: every XADD to it is refused (WRONGTYPE).
const POISONED: &str = "security:poisoned";

/// What each trap writes to the server log, followed by `<who> ran <what>`.
const MARK: &str = "LOG:  security-trap: ";

/// The attacker's logger: every trap calls it first.
const LOGGER: &str = "
CREATE FUNCTION public.evil_log(what pg_catalog.text) RETURNS pg_catalog.bool
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.pwned VALUES (current_user, what);
    RAISE LOG 'security-trap: % ran %', current_user, what;
    RETURN true;
END$$";

/// Operators the extension's SQL uses (sql/outbox.sql, the relay's statements in
/// src/worker.rs), by their exact argument types: (operator, left, right, result). `<=` is not
/// used; it is planted all the same.
const OPERATORS: &[(&str, &str, &str, &str)] = &[
    ("=", "uuid", "uuid", "bool"),
    ("=", "int8", "int8", "bool"),
    ("=", "text", "text", "bool"),
    ("=", "oid", "oid", "bool"),
    ("=", "tid", "tid", "bool"),
    ("=", "name", "name", "bool"),
    ("<>", "oid", "oid", "bool"),
    ("<", "int8", "int8", "bool"),
    (">", "int8", "int8", "bool"),
    ("<=", "int8", "int8", "bool"),
    (">=", "int8", "int8", "bool"),
    ("<", "int4", "int4", "bool"),
    (">", "int4", "int4", "bool"),
    ("<=", "int4", "int4", "bool"),
    (">=", "int4", "int4", "bool"),
    ("<", "timestamptz", "timestamptz", "bool"),
    (">", "timestamptz", "timestamptz", "bool"),
    ("<=", "timestamptz", "timestamptz", "bool"),
    (">=", "timestamptz", "timestamptz", "bool"),
    ("+", "timestamptz", "interval", "timestamptz"),
    ("+", "int4", "int4", "int4"),
    ("-", "timestamptz", "interval", "timestamptz"),
    ("-", "timestamptz", "timestamptz", "interval"),
    // pg_catalog has no bigint * interval: status's `last_success_us * interval` casts to
    // float8 there, and an exact match in public beats it even with pg_catalog first.
    ("*", "int8", "interval", "interval"),
    ("*", "float8", "interval", "interval"),
];

/// A function the extension's SQL (or its install script) calls, planted with its exact
/// parameters.
struct Function {
    what: &'static str,
    name: &'static str,
    parameters: &'static str,
    result: &'static str,
    /// The real call whose result the trap returns (none for `void`).
    real: &'static str,
    probe: Option<&'static str>,
}

/// The functions. `coalesce` is a construct the parser never looks up: planted, never called,
/// not probed.
const FUNCTIONS: &[Function] = &[
    Function {
        what: "now()",
        name: "now",
        parameters: "",
        result: "timestamptz",
        real: "pg_catalog.now()",
        probe: Some("SELECT now()"),
    },
    Function {
        what: "round(numeric, int4)",
        name: "round",
        parameters: "pg_catalog.numeric, pg_catalog.int4",
        result: "numeric",
        real: "pg_catalog.round($1, $2)",
        probe: Some("SELECT round(1.25::pg_catalog.numeric, 1)"),
    },
    Function {
        what: "current_setting(text)",
        name: "current_setting",
        parameters: "pg_catalog.text",
        result: "text",
        real: "pg_catalog.current_setting($1)",
        probe: Some("SELECT current_setting('search_path')"),
    },
    Function {
        what: "make_interval(years, months, weeks, days, hours, mins, secs)",
        name: "make_interval",
        parameters: "years pg_catalog.int4 DEFAULT 0, months pg_catalog.int4 DEFAULT 0, \
         weeks pg_catalog.int4 DEFAULT 0, days pg_catalog.int4 DEFAULT 0, \
         hours pg_catalog.int4 DEFAULT 0, mins pg_catalog.int4 DEFAULT 0, \
         secs pg_catalog.float8 DEFAULT 0.0",
        result: "interval",
        real: "pg_catalog.make_interval(years, months, weeks, days, hours, mins, secs)",
        probe: Some("SELECT make_interval(secs => 1.5::pg_catalog.float8)"),
    },
    Function {
        what: "gen_random_uuid()",
        name: "gen_random_uuid",
        parameters: "",
        result: "uuid",
        real: "pg_catalog.gen_random_uuid()",
        probe: Some("SELECT gen_random_uuid()"),
    },
    Function {
        what: "current_database()",
        name: "current_database",
        parameters: "",
        result: "name",
        real: "pg_catalog.current_database()",
        probe: Some("SELECT current_database()"),
    },
    Function {
        what: "pg_get_serial_sequence(text, text)",
        name: "pg_get_serial_sequence",
        parameters: "pg_catalog.text, pg_catalog.text",
        result: "text",
        real: "pg_catalog.pg_get_serial_sequence($1, $2)",
        probe: Some("SELECT pg_get_serial_sequence('public.pwned', 'who')"),
    },
    Function {
        what: "set_config(text, text, bool)",
        name: "set_config",
        parameters: "pg_catalog.text, pg_catalog.text, pg_catalog.bool",
        result: "text",
        real: "pg_catalog.set_config($1, $2, $3)",
        probe: Some("SELECT set_config('application_name', 'evil', false)"),
    },
    Function {
        what: "quote_ident(text)",
        name: "quote_ident",
        parameters: "pg_catalog.text",
        result: "text",
        real: "pg_catalog.quote_ident($1)",
        probe: Some("SELECT quote_ident('a b')"),
    },
    Function {
        what: "pg_extension_config_dump(regclass, text)",
        name: "pg_extension_config_dump",
        parameters: "pg_catalog.regclass, pg_catalog.text",
        result: "void",
        real: "",
        probe: Some("SELECT pg_extension_config_dump('public.pwned', '')"),
    },
    Function {
        what: "coalesce(text, text)",
        name: "coalesce",
        parameters: "pg_catalog.text, pg_catalog.text",
        result: "text",
        real: "$1",
        probe: None,
    },
];

/// Catalog relations the extension's SQL names unqualified: `broadcaster_status` joins
/// `pg_database`; the relay finds its schema in `pg_extension` and `pg_namespace`.
const CATALOGS: &[&str] = &["pg_database", "pg_extension", "pg_namespace"];

/// Type names the extension's SQL spells at run time (not keywords such as `bigint` or
/// `interval`, which always mean pg_catalog's): `timestamptz '2000-01-01...'` in
/// `broadcaster_status`, `::text` and `::regclass::oid` in the relay's setup.
const TYPES: &[(&str, &str)] = &[
    ("timestamptz", "'2000-01-01 00:00:00+00'::timestamptz"),
    ("text", "'a'::text"),
    ("oid", "1::oid"),
    ("regclass", "'pg_class'::regclass"),
];

/// One trap: the statements that plant it, run by `evil` one by one, and what `evil` runs,
/// with `public` first, to prove it armed (None: never reachable, by design).
struct Trap {
    what: String,
    statements: Vec<String>,
    probe: Option<String>,
}

/// A typed literal of `ty` for the probes.
fn sample(ty: &str) -> String {
    let literal = match ty {
        "uuid" => "'00000000-0000-0000-0000-000000000001'",
        "tid" => "'(0,1)'",
        "timestamptz" => "'2000-01-01 00:00:00+00'",
        "interval" => "'1 second'",
        "text" | "name" => "'a'",
        _ => "'1'",
    };
    format!("{literal}::pg_catalog.{ty}")
}

fn traps() -> Vec<Trap> {
    let mut traps = Vec::new();
    for (n, (op, left, right, result)) in OPERATORS.iter().enumerate() {
        let what = format!("{op}({left}, {right})");
        let function = format!("public.evil_operator_{n}");
        traps.push(Trap {
            statements: vec![
                format!(
                    "CREATE FUNCTION {function}(pg_catalog.{left}, pg_catalog.{right}) \
                     RETURNS pg_catalog.{result} LANGUAGE plpgsql AS $$BEGIN \
                     PERFORM public.evil_log('{what}'); \
                     RETURN $1 OPERATOR(pg_catalog.{op}) $2; END$$"
                ),
                format!(
                    "CREATE OPERATOR public.{op} (LEFTARG = pg_catalog.{left}, \
                     RIGHTARG = pg_catalog.{right}, FUNCTION = {function})"
                ),
            ],
            probe: Some(format!("SELECT {} {op} {}", sample(left), sample(right))),
            what,
        });
    }
    for Function {
        what,
        name,
        parameters,
        result,
        real,
        probe,
    } in FUNCTIONS
    {
        let tail = if *result == "void" {
            String::new()
        } else {
            format!("RETURN {real};")
        };
        traps.push(Trap {
            what: what.to_string(),
            statements: vec![format!(
                "CREATE FUNCTION public.{name}({parameters}) RETURNS pg_catalog.{result} \
                 LANGUAGE plpgsql AS $$BEGIN PERFORM public.evil_log('{what}'); {tail} END$$"
            )],
            probe: probe.map(str::to_string),
        });
    }
    // Aggregates: the final function runs once per group, whatever the number of rows.
    traps.push(Trap {
        what: "count(*)".into(),
        statements: vec![
            "CREATE FUNCTION public.evil_count_step(pg_catalog.int8) RETURNS pg_catalog.int8 \
             LANGUAGE sql AS $$ SELECT $1 OPERATOR(pg_catalog.+) 1 $$"
                .into(),
            "CREATE FUNCTION public.evil_count_final(pg_catalog.int8) RETURNS pg_catalog.int8 \
             LANGUAGE plpgsql AS $$BEGIN PERFORM public.evil_log('count(*)'); RETURN $1; END$$"
                .into(),
            "CREATE AGGREGATE public.count(*) (SFUNC = public.evil_count_step, \
             STYPE = pg_catalog.int8, INITCOND = '0', FINALFUNC = public.evil_count_final)"
                .into(),
        ],
        probe: Some("SELECT count(*) FROM (VALUES (1)) v".into()),
    });
    traps.push(Trap {
        what: "min(timestamptz)".into(),
        statements: vec![
            "CREATE FUNCTION public.evil_min_step(pg_catalog.timestamptz, pg_catalog.timestamptz) \
             RETURNS pg_catalog.timestamptz LANGUAGE sql STRICT AS \
             $$ SELECT CASE WHEN $2 OPERATOR(pg_catalog.<) $1 THEN $2 ELSE $1 END $$"
                .into(),
            "CREATE FUNCTION public.evil_min_final(pg_catalog.timestamptz) \
             RETURNS pg_catalog.timestamptz LANGUAGE plpgsql AS \
             $$BEGIN PERFORM public.evil_log('min(timestamptz)'); RETURN $1; END$$"
                .into(),
            "CREATE AGGREGATE public.min(pg_catalog.timestamptz) (SFUNC = public.evil_min_step, \
             STYPE = pg_catalog.timestamptz, FINALFUNC = public.evil_min_final)"
                .into(),
        ],
        probe: Some(format!(
            "SELECT min(t) FROM (VALUES ({})) v(t)",
            sample("timestamptz")
        )),
    });
    for catalog in CATALOGS {
        let what = format!("view {catalog}");
        traps.push(Trap {
            statements: vec![format!(
                "CREATE VIEW public.{catalog} AS SELECT * FROM pg_catalog.{catalog} \
                 WHERE public.evil_log('{what}')"
            )],
            probe: Some(format!("SELECT 1 FROM {catalog} LIMIT 1")),
            what,
        });
    }
    // Last: from here on `text` in public is the attacker's (evil's own statements above
    // name pg_catalog's types).
    for (ty, probe) in TYPES {
        let what = format!("domain {ty}");
        traps.push(Trap {
            statements: vec![format!(
                "CREATE DOMAIN public.{ty} AS pg_catalog.{ty} CHECK (public.evil_log('{what}'))"
            )],
            probe: Some(format!("SELECT {probe}")),
            what,
        });
    }
    // A literal is of type unknown until resolved: an exact match on (unknown) would beat
    // current_setting(text) even with pg_catalog first. PostgreSQL refuses both languages
    // `evil` may use (C and internal functions need a superuser). Last: a server that crashes
    // on a refused statement disturbs no other trap.
    for language in ["sql", "plpgsql"] {
        traps.push(Trap {
            what: format!("current_setting(unknown) in {language}"),
            statements: vec![format!(
                "CREATE FUNCTION public.current_setting(unknown) RETURNS pg_catalog.text \
                 LANGUAGE {language} AS $$ SELECT pg_catalog.current_setting('search_path') $$"
            )],
            probe: Some("SELECT current_setting('search_path')".into()),
        });
    }
    traps
}

fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

fn connect_as(cluster: &Cluster, user: &str) -> PgClient {
    let params = format!(
        "host=127.0.0.1 port={} user={user} dbname=postgres connect_timeout=5",
        cluster.port
    );
    common::wait_for(&format!("a connection as {user}"), DEADLINE, || {
        PgClient::connect(&params, postgres::NoTls).ok()
    })
}

/// A new session once the server is back from a crash: the postmaster first ends every
/// backend, so a session opened too early is ended too.
fn reconnect(cluster: &Cluster, user: &str) -> PgClient {
    common::wait_for(&format!("the server back, as {user}"), DEADLINE, || {
        std::thread::sleep(std::time::Duration::from_millis(500));
        let mut c = connect_as(cluster, user);
        c.simple_query("SELECT 1").ok().map(|_| c)
    })
}

/// A superuser session the traps can't reach: `public` is not in its path at all (it names
/// the extension's objects and `public.pwned` qualified). For the test's own checks, and as the
/// superuser of the relay test.
fn safe_session(cluster: &Cluster) -> PgClient {
    let mut c = connect_as(cluster, "postgres");
    c.batch_execute("SET search_path = pg_catalog, pg_temp")
        .expect("a safe search_path");
    c
}

struct Armed {
    created: Vec<Trap>,
    refused: Vec<(String, String)>,
}

/// As the issue does: role `evil` (LOGIN, CREATE on public, INSERT on public.pwned, nothing
/// else) plants every trap, each in statements of its own; what PostgreSQL refuses is noted.
fn arm(cluster: &Cluster) -> Armed {
    safe_session(cluster)
        .batch_execute(
            "CREATE ROLE evil LOGIN; \
             GRANT CREATE ON SCHEMA public TO evil; \
             CREATE TABLE public.pwned (who text, what text); \
             GRANT INSERT ON public.pwned TO evil",
        )
        .expect("the attacker's role");
    let mut evil = connect_as(cluster, "evil");
    evil.batch_execute(LOGGER).expect("the attacker's logger");
    let mut created = Vec::new();
    let mut refused = Vec::new();
    for trap in traps() {
        let mut refusal = None;
        for sql in &trap.statements {
            if let Err(e) = evil.batch_execute(sql) {
                refusal = Some(match e.as_db_error() {
                    Some(_) => describe(&e),
                    // No answer but a closed connection: the server crashed (a finding of its
                    // own, which `judge` reports from the log). Go on once it is back.
                    None => {
                        evil = reconnect(cluster, "evil");
                        format!("THE SERVER CRASHED ({e})")
                    }
                });
                break;
            }
        }
        match refusal {
            None => created.push(trap),
            Some(why) => refused.push((trap.what, why)),
        }
    }
    println!("planted {} traps in public", created.len());
    for (what, why) in &refused {
        println!("not planted: {what}: {why}");
    }
    Armed { created, refused }
}

/// What fired for `evil` so far.
fn fired_for_evil(safe: &mut PgClient) -> Vec<String> {
    safe.query(
        "SELECT DISTINCT what FROM public.pwned WHERE who = 'evil' ORDER BY what",
        &[],
    )
    .expect("public.pwned")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// The trap is armed: `evil` reaches the issue's `bigint * interval` with the default path,
/// and every trap with `public` first.
fn prove_armed(cluster: &Cluster, armed: &Armed) {
    let mut evil = connect_as(cluster, "evil");
    let mut safe = safe_session(cluster);
    evil.simple_query("SELECT 1::pg_catalog.int8 * '1 second'::pg_catalog.interval")
        .expect("bigint * interval");
    assert!(
        fired_for_evil(&mut safe).contains(&"*(int8, interval)".to_string()),
        "with the default search_path, bigint * interval should reach the attacker's operator"
    );
    evil.batch_execute("SET search_path = public, pg_catalog")
        .expect("public first");
    let mut failed = Vec::new();
    for trap in &armed.created {
        if let Some(probe) = &trap.probe {
            if let Err(e) = evil.simple_query(probe) {
                failed.push(format!("{}: {probe}: {}", trap.what, describe(&e)));
            }
        }
    }
    let fired = fired_for_evil(&mut safe);
    let silent: Vec<&str> = armed
        .created
        .iter()
        .filter(|t| t.probe.is_some() && !fired.contains(&t.what))
        .map(|t| t.what.as_str())
        .collect();
    println!("| trap | armed (fired for evil, public first) |");
    for trap in &armed.created {
        let state = match &trap.probe {
            None => "planted, never reachable (a construct)",
            Some(_) if fired.contains(&trap.what) => "yes",
            Some(_) => "NO",
        };
        println!("| {} | {state} |", trap.what);
    }
    for (what, why) in &armed.refused {
        println!("| {what} | not planted: {why} |");
    }
    assert!(
        failed.is_empty() && silent.is_empty(),
        "the traps are not all armed: probes failed {failed:#?}, never fired {silent:#?}"
    );
}

/// `(who, what, how many)` of every trap that ran as someone other than `evil`, by
/// `public.pwned`, and the same from the server log (with the backend that ran it), which
/// keeps what a rolled-back transaction wrote.
fn ran_as_others(cluster: &Cluster) -> (Vec<String>, Vec<String>) {
    let mut safe = safe_session(cluster);
    let rows = safe
        .query(
            "SELECT who, what, count(*) FROM public.pwned WHERE who <> 'evil' \
             GROUP BY who, what ORDER BY who, what",
            &[],
        )
        .expect("public.pwned")
        .iter()
        .map(|r| {
            format!(
                "{} ran {} ({} times)",
                r.get::<_, String>(0),
                r.get::<_, String>(1),
                r.get::<_, i64>(2)
            )
        })
        .collect();
    let mut logged: BTreeMap<String, usize> = BTreeMap::new();
    for line in cluster.log().lines() {
        let Some((head, tail)) = line.split_once(MARK) else {
            continue;
        };
        if tail.starts_with("evil ran ") {
            continue;
        }
        // log_line_prefix '%m [%p] %b ': the backend type follows the pid.
        let backend = head.split_once("] ").map_or("?", |(_, b)| b.trim());
        *logged.entry(format!("{backend}: {tail}")).or_default() += 1;
    }
    let logged = logged
        .into_iter()
        .map(|(k, n)| format!("{k} ({n} times)"))
        .collect();
    (rows, logged)
}

/// Runs `scenario`, then fails if any trap ran as anyone but `evil` (listing what ran), or if
/// the scenario failed, in that order: what ran explains a failure best.
fn judge(cluster: &Cluster, scenario: impl FnOnce() -> Vec<String>) {
    let outcome = panic::catch_unwind(AssertUnwindSafe(scenario));
    let (rows, logged) = ran_as_others(cluster);
    // A backend the attacker (or anyone) brought down takes the whole cluster with it.
    let log = cluster.log();
    let crashes = common::lines_with(&log, "was terminated by signal");
    let errors = outcome.as_ref().cloned().unwrap_or_default();
    println!("public.pwned, rows by others than evil: {rows:#?}");
    println!("server log, traps run by others than evil: {logged:#?}");
    println!("server log, crashes: {crashes:#?}");
    assert!(
        rows.is_empty() && logged.is_empty() && crashes.is_empty(),
        "the attacker's code ran, or the server crashed:\n  public.pwned: {rows:#?}\n  \
         server log: {logged:#?}\n  crashes: {crashes:#?}\n  calls that failed: {errors:#?}{}",
        if outcome.is_err() {
            "\n  (and the scenario itself panicked: see above)"
        } else {
            ""
        }
    );
    match outcome {
        Ok(errors) => assert!(errors.is_empty(), "calls failed: {errors:#?}"),
        Err(panicked) => panic::resume_unwind(panicked),
    }
}

/// A superuser's session calling the extension: statements go through the simple protocol
/// (no type look-ups by the client), and name the extension's objects `EXT.`, replaced by
/// `ext`.
struct Calls {
    c: PgClient,
    label: &'static str,
    ext: &'static str,
    /// Failures of calls that don't stop the scenario.
    errors: Vec<String>,
}

type Rows = Vec<Vec<Option<String>>>;

impl Calls {
    fn new(c: PgClient, label: &'static str, ext: &'static str) -> Calls {
        Calls {
            c,
            label,
            ext,
            errors: Vec::new(),
        }
    }

    fn try_rows(&mut self, template: &str) -> Result<Rows, String> {
        let sql = template.replace("EXT.", self.ext);
        match self.c.simple_query(&sql) {
            Ok(messages) => Ok(messages
                .iter()
                .filter_map(|m| match m {
                    SimpleQueryMessage::Row(row) => Some(
                        (0..row.len())
                            .map(|i| row.get(i).map(str::to_string))
                            .collect(),
                    ),
                    _ => None,
                })
                .collect()),
            Err(e) => Err(format!("[{}] {sql}: {}", self.label, describe(&e))),
        }
    }

    /// A call the scenario does not depend on: a failure is noted.
    fn call(&mut self, template: &str) -> Rows {
        self.try_rows(template).unwrap_or_else(|e| {
            self.errors.push(e);
            Vec::new()
        })
    }

    /// A call the rest depends on.
    fn run(&mut self, template: &str) -> Rows {
        self.try_rows(template).unwrap_or_else(|e| panic!("{e}"))
    }

    fn value(&mut self, template: &str) -> String {
        let rows = self.run(template);
        rows.into_iter()
            .next()
            .and_then(|r| r.into_iter().next().flatten())
            .unwrap_or_else(|| panic!("[{}] {template}: no value", self.label))
    }

    /// Every reading function and view.
    fn read_everything(&mut self) {
        if self.call("SELECT * FROM EXT.broadcaster_status").is_empty() {
            self.errors
                .push(format!("[{}] broadcaster_status has no row", self.label));
        }
        for sql in [
            "SELECT * FROM EXT.broadcaster_status()",
            "SELECT EXT.broadcaster_default_source()",
            "SELECT EXT.broadcaster_health()",
            "SELECT * FROM EXT.broadcaster_relays()",
            "SELECT * FROM EXT.broadcaster_dead_events",
        ] {
            self.call(sql);
        }
    }

    /// Publishes an event to the poisoned stream under a key of its own.
    fn poison(&mut self, n: u32) -> String {
        self.value(&format!(
            "SELECT EXT.broadcaster_publish(type => 'security.poison', stream => '{POISONED}', \
             partition_key => 'poison-{}-{n}')",
            self.label
        ))
    }
}

fn uuids(ids: &[&str]) -> String {
    format!("'{{{}}}'::pg_catalog.uuid[]", ids.join(","))
}

fn wait_dead(safe: &mut PgClient, id: &str) {
    let attempts = common::wait_for(&format!("event {id} dead"), DEADLINE, || {
        safe.query_opt(
            "SELECT attempts FROM public.broadcaster_dead_events WHERE id::text = $1",
            &[&id],
        )
        .ok()
        .flatten()
        .map(|r| r.get::<_, i32>(0))
    });
    assert_eq!(attempts, 2, "{id}: attempts of a dead event");
}

/// The count `sql` (a `count(*)`) returns.
fn count(safe: &mut PgClient, sql: &str, params: &[&(dyn ToSql + Sync)]) -> i64 {
    safe.query_one(sql, params)
        .map(|r| r.get::<_, i64>(0))
        .unwrap_or(-1)
}

fn wait_count(
    safe: &mut PgClient,
    what: &str,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    want: i64,
) {
    common::wait_for(what, DEADLINE, || {
        (count(safe, sql, params) == want).then_some(())
    });
}

/// Times `id` is in `stream`.
fn copies(redis: &Redis, stream: &str, id: &str) -> usize {
    redis.event_ids(stream).iter().filter(|e| *e == id).count()
}

fn wait_copies(redis: &Redis, stream: &str, id: &str, at_least: usize) {
    common::wait_for(
        &format!("{at_least} copies of {id} in {stream}"),
        DEADLINE,
        || (copies(redis, stream, id) >= at_least).then_some(()),
    );
}

/// Pending (not dead) outbox rows.
const PENDING: &str = "SELECT count(*) FROM public.broadcaster_outbox o \
     WHERE NOT EXISTS (SELECT 1 FROM public.broadcaster_failures f \
                        WHERE f.seq = o.seq AND f.dead)";
const FAILURES: &str = "SELECT count(*) FROM public.broadcaster_failures";
/// Outbox rows of one event.
const IN_OUTBOX: &str = "SELECT count(*) FROM public.broadcaster_outbox WHERE id::text = $1";

/// Every function and view of the extension called through `calls`, while the relay runs each
/// of its paths: claim and publish, a batch that fails partly (retire what went out, record the
/// failure), dead events requeued, discarded, their failures deleted, a failure forgotten once
/// its row is gone, a retry that succeeds (clear), purge, replay, TRUNCATE. `safe` watches.
fn exercise(redis: &Redis, safe: &mut PgClient, calls: &mut Calls) {
    let tag = calls.label;
    calls.read_everything();

    // One transaction, so one batch: Redis refuses the poisoned event, the relay retires the
    // others (keeping them for replay) and records the failure.
    calls.run("BEGIN");
    let good = calls.value(&format!(
        "SELECT EXT.broadcaster_publish(type => 'security.good', data => '{{\"phase\": \"{tag}\"}}', \
         source => 'urn:security', subject => '{tag}', partition_key => 'good-{tag}', \
         extensions => '{{\"phase\": \"{tag}\"}}', stream => NULL)"
    ));
    let inserted = calls.value(&format!(
        "INSERT INTO EXT.broadcaster_outbox (type, data, partition_key) \
         VALUES ('security.insert', '{{\"phase\": \"{tag}\"}}', 'good-{tag}') RETURNING id"
    ));
    let p1 = calls.poison(1);
    let good2 = calls.value(&format!(
        "SELECT EXT.broadcaster_publish('security.good', '{{\"phase\": \"{tag}\", \"n\": 2}}')"
    ));
    calls.run("COMMIT");
    let expected = [good.clone(), inserted.clone(), good2.clone()];
    let delivered = redis.wait_for_ids(DEFAULT_STREAM, &expected, DEADLINE);
    for id in &expected {
        assert!(delivered.contains(id), "[{tag}] {id} not delivered");
    }
    wait_dead(safe, &p1);
    wait_count(
        safe,
        "the good event retained",
        "SELECT count(*) FROM public.broadcaster_published WHERE id::text = $1",
        &[&good],
        1,
    );
    let dead = calls.run("SELECT * FROM EXT.broadcaster_dead_events");
    assert!(
        dead.iter()
            .any(|r| r.first().cloned().flatten() == Some(p1.clone())),
        "[{tag}] broadcaster_dead_events lacks {p1}: {dead:?}"
    );
    calls.read_everything();

    // Requeued, by id then all: tried twice more each time, dead again.
    let requeued = calls.value(&format!(
        "SELECT EXT.broadcaster_requeue({})",
        uuids(&[&p1])
    ));
    assert_eq!(requeued, "1", "[{tag}] requeue");
    wait_dead(safe, &p1);
    assert_eq!(
        calls.value("SELECT EXT.broadcaster_requeue_all()"),
        "1",
        "[{tag}] requeue_all"
    );
    wait_dead(safe, &p1);

    // Discarded, by id then all (p1 and p3).
    calls.run("BEGIN");
    let p2 = calls.poison(2);
    let p3 = calls.poison(3);
    calls.run("COMMIT");
    wait_dead(safe, &p2);
    wait_dead(safe, &p3);
    let discarded = calls.value(&format!(
        "SELECT EXT.broadcaster_discard({})",
        uuids(&[&p2])
    ));
    assert_eq!(discarded, "1", "[{tag}] discard");
    assert_eq!(
        calls.value("SELECT EXT.broadcaster_discard_all()"),
        "2",
        "[{tag}] discard_all"
    );
    for id in [&p1, &p2, &p3] {
        assert_eq!(count(safe, IN_OUTBOX, &[id]), 0, "[{tag}] {id} discarded");
    }

    // Its failures deleted (the statement trigger wakes the relay): tried again, dead again.
    // Then its row deleted by hand: the relay forgets the failure left behind.
    let p4 = calls.poison(4);
    wait_dead(safe, &p4);
    calls.run("DELETE FROM EXT.broadcaster_failures");
    wait_dead(safe, &p4);
    safe.execute(
        "DELETE FROM public.broadcaster_outbox WHERE id::text = $1",
        &[&p4],
    )
    .expect("delete p4 by hand");
    wait_count(safe, "the relay to forget p4's failure", FAILURES, &[], 0);

    // A retry that succeeds clears its failure: p5 dead, Redis cured, its failure made due
    // again by hand (a requeue would delete it first).
    let p5 = calls.poison(5);
    wait_dead(safe, &p5);
    let mut r = redis.connection();
    redis::cmd("DEL")
        .arg(POISONED)
        .query::<i64>(&mut r)
        .expect("DEL");
    safe.execute(
        "UPDATE public.broadcaster_failures f SET dead = false, next_attempt_at = now() \
         FROM public.broadcaster_outbox o WHERE o.seq = f.seq AND o.id::text = $1",
        &[&p5],
    )
    .expect("make p5 due");
    wait_copies(redis, POISONED, &p5, 1);
    wait_count(safe, "the relay to clear p5's failure", FAILURES, &[], 0);
    redis.set_string(POISONED);

    // Purged: a row retained two hours ago goes.
    let old = format!("security.old.{tag}");
    safe.execute(
        "INSERT INTO public.broadcaster_published \
                (seq, id, type, source, time, datacontenttype, extensions, published_at) \
         VALUES (0, gen_random_uuid(), $1, 'urn:security', now() - interval '3 hours', \
                 'application/json', '{}', now() - interval '2 hours')",
        &[&old],
    )
    .expect("an old retained event");
    wait_count(
        safe,
        "the relay to purge the old retained event",
        "SELECT count(*) FROM public.broadcaster_published WHERE type = $1",
        &[&old],
        0,
    );

    // Replayed: by id, by time (every retained event once, p5's to the poisoned stream again,
    // where it fails), by time and type.
    let before = copies(redis, DEFAULT_STREAM, &good);
    let replayed = calls.value(&format!(
        "SELECT EXT.broadcaster_replay({})",
        uuids(&[&good])
    ));
    assert_eq!(replayed, "1", "[{tag}] replay by id");
    wait_copies(redis, DEFAULT_STREAM, &good, before + 1);
    let replayed: i64 = calls
        .value(
            "SELECT EXT.broadcaster_replay(pg_catalog.now() OPERATOR(pg_catalog.-) interval '1 hour')",
        )
        .parse()
        .expect("a count");
    assert!(replayed >= 4, "[{tag}] replay by time: {replayed}");
    wait_copies(redis, DEFAULT_STREAM, &good, before + 2);
    wait_copies(redis, DEFAULT_STREAM, &inserted, 2);
    let replayed: i64 = calls
        .value(
            "SELECT EXT.broadcaster_replay(since => pg_catalog.now() OPERATOR(pg_catalog.-) \
             interval '1 hour', until => 'infinity', event_type => 'security.insert')",
        )
        .parse()
        .expect("a count");
    assert!(replayed >= 1, "[{tag}] replay by time and type: {replayed}");
    wait_copies(redis, DEFAULT_STREAM, &inserted, 3);
    wait_count(safe, "nothing pending", PENDING, &[], 0);

    // TRUNCATE (its trigger takes the failures along): p6, and p5's replay, dead, then gone.
    let p6 = calls.poison(6);
    wait_dead(safe, &p6);
    calls.run("TRUNCATE EXT.broadcaster_outbox");
    assert_eq!(count(safe, IN_OUTBOX, &[&p6]), 0, "[{tag}] truncated");
    assert_eq!(count(safe, FAILURES, &[]), 0, "[{tag}] failures truncated");

    calls.read_everything();
}

#[test]
fn a_superuser_using_the_extension_runs_nothing_of_an_attacker_in_public() {
    let s = Setup::new(SETTINGS);
    s.redis.set_string(POISONED);
    let armed = arm(&s.cluster);
    prove_armed(&s.cluster, &armed);
    judge(&s.cluster, || {
        let mut safe = safe_session(&s.cluster);
        let mut errors = Vec::new();
        for (label, path) in [
            ("default", None),
            ("public-first", Some("public, pg_catalog")),
        ] {
            let mut calls = Calls::new(connect_as(&s.cluster, "postgres"), label, "");
            match path {
                None => assert_eq!(calls.value("SHOW search_path"), "\"$user\", public"),
                Some(path) => {
                    calls.run(&format!("SET search_path = {path}"));
                }
            }
            exercise(&s.redis, &mut safe, &mut calls);
            if path.is_some() {
                // Last: DROP EXTENSION, which the extension's utility hook looks at first.
                calls.call("DROP EXTENSION broadcaster");
            }
            errors.extend(calls.errors);
        }
        errors
    });
}

/// CVE-2023-2454's class: the schema the extension is installed into already holds the traps.
#[test]
fn create_extension_over_attacker_objects_runs_none_of_them() {
    let redis = Redis::start();
    let cluster = Cluster::start(&redis.url(), SETTINGS);
    let armed = arm(&cluster);
    prove_armed(&cluster, &armed);
    judge(&cluster, || {
        let mut calls = Calls::new(connect_as(&cluster, "postgres"), "install", "");
        assert_eq!(calls.value("SHOW search_path"), "\"$user\", public");
        calls.run("CREATE EXTENSION broadcaster");
        let published = calls.value("SELECT broadcaster_publish('security.installed', '{}')");
        let inserted = calls.value(
            "INSERT INTO broadcaster_outbox (type, data) VALUES ('security.inserted', '{}') \
             RETURNING id",
        );
        let expected = [published, inserted];
        let delivered = redis.wait_for_ids(DEFAULT_STREAM, &expected, DEADLINE);
        for id in &expected {
            assert!(delivered.contains(id), "{id} not delivered");
        }
        // The install script's own calls did their work (none of them went to a trap instead).
        let mut safe = safe_session(&cluster);
        let dumped: i32 = safe
            .query_one(
                "SELECT coalesce(cardinality(extconfig), 0) FROM pg_extension \
                 WHERE extname = 'broadcaster'",
                &[],
            )
            .expect("pg_extension")
            .get(0);
        assert!(
            dumped >= 5,
            "tables and sequence marked for pg_dump: {dumped}"
        );
        let origin: i64 = safe
            .query_one("SELECT count(*) FROM public.broadcaster_origin", &[])
            .expect("broadcaster_origin")
            .get(0);
        assert_eq!(origin, 1, "broadcaster_origin filled by the install script");
        calls.errors
    });
}

/// The relay's own session, when its database puts `public` first (ALTER DATABASE ... SET
/// search_path): the relay runs its whole round, driven by a superuser the traps can't reach.
#[test]
fn a_relay_whose_database_puts_public_first_runs_nothing_of_an_attacker() {
    let s = Setup::new(SETTINGS);
    s.redis.set_string(POISONED);
    let armed = arm(&s.cluster);
    prove_armed(&s.cluster, &armed);
    judge(&s.cluster, || {
        let mut safe = safe_session(&s.cluster);
        safe.batch_execute("ALTER DATABASE postgres SET search_path = public, pg_catalog")
            .expect("ALTER DATABASE");
        let relay = "SELECT pid FROM pg_stat_activity \
                     WHERE backend_type = 'broadcaster relay' AND datname = 'postgres'";
        let old: i32 = common::wait_for("the relay", DEADLINE, || {
            safe.query_opt(relay, &[]).ok().flatten().map(|r| r.get(0))
        });
        safe.execute("SELECT pg_terminate_backend($1)", &[&old])
            .expect("terminate the relay");
        let new: i32 = common::wait_for("a new relay", DEADLINE, || {
            safe.query_opt(relay, &[])
                .ok()
                .flatten()
                .map(|r| r.get(0))
                .filter(|pid| *pid != old)
        });
        println!("relay {old} replaced by {new}, its database's path puts public first");
        let mut calls = Calls::new(safe_session(&s.cluster), "relay", "public.");
        exercise(&s.redis, &mut safe, &mut calls);
        calls.errors
    });
}
