//! Row-change capture: `broadcaster_capture` turns an application's writes, through Django's
//! ORM and SQLAlchemy's, into CloudEvents, checked with the CloudEvents SDK for Python.

mod common;

use std::process::Command;

use common::{Setup, DEFAULT_STREAM};

const TABLES: &str = r#"
CREATE TABLE orders (
    id          bigserial PRIMARY KEY,
    customer_id int NOT NULL,
    total       numeric(10, 2) NOT NULL,
    password    text NOT NULL DEFAULT '',
    note        text NOT NULL DEFAULT '',
    total_cents bigint GENERATED ALWAYS AS ((total * 100)::bigint) STORED
);
-- Kept out of line, uncompressed, past about 2 kB: the big note really is TOASTed.
ALTER TABLE orders ALTER COLUMN note SET STORAGE EXTERNAL;
CREATE TRIGGER orders_events AFTER INSERT OR UPDATE OR DELETE ON orders
    FOR EACH ROW EXECUTE FUNCTION broadcaster_capture('shop.order', 'exclude=password', 'stream=capture');
CREATE TABLE order_lines (order_id int, line int, sku text, PRIMARY KEY (order_id, line));
CREATE TRIGGER order_lines_events AFTER INSERT OR UPDATE OR DELETE ON order_lines
    FOR EACH ROW EXECUTE FUNCTION broadcaster_capture('shop.line', 'stream=capture');
CREATE TABLE audit_log (message text);
CREATE TRIGGER audit_log_events AFTER INSERT ON audit_log
    FOR EACH ROW EXECUTE FUNCTION broadcaster_capture('shop.audit', 'stream=capture');
CREATE TABLE measurements (id int, at date, value numeric, PRIMARY KEY (id, at))
    PARTITION BY RANGE (at);
CREATE TABLE measurements_h1 PARTITION OF measurements FOR VALUES FROM ('2026-01-01') TO ('2026-07-01');
CREATE TABLE measurements_h2 PARTITION OF measurements FOR VALUES FROM ('2026-07-01') TO ('2027-01-01');
CREATE TRIGGER measurements_events AFTER INSERT ON measurements
    FOR EACH ROW EXECUTE FUNCTION broadcaster_capture('shop.measurement', 'stream=capture', 'partition_key=id');
"#;

#[test]
fn row_changes_from_django_and_sqlalchemy_become_cloudevents() {
    let s = Setup::new(&[]);
    let mut c = s.cluster.connect();
    c.batch_execute(TABLES).expect("tables and triggers");
    // A change rolled back is no event.
    c.batch_execute("BEGIN; INSERT INTO audit_log VALUES ('rolled back'); ROLLBACK")
        .expect("rolled back");
    let out = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/clients/capture_with_orms.py"
        ))
        .arg(s.cluster.port.to_string())
        .arg(s.redis.port.to_string())
        .output()
        .expect("python3 runs (scripts/setup.sh installs its packages)");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(s.redis.len("capture"), 15, "no more events than writes");
    assert_eq!(s.redis.len(DEFAULT_STREAM), 0);
}

#[test]
fn capture_refuses_bad_options_with_a_sqlstate() {
    let s = Setup::new(&[]);
    let mut c = s.cluster.connect();
    c.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY); \
         CREATE TRIGGER bad AFTER INSERT ON t \
           FOR EACH ROW EXECUTE FUNCTION broadcaster_capture('x', 'colour=red'); \
         CREATE TABLE u (id int PRIMARY KEY); \
         CREATE TRIGGER early BEFORE INSERT ON u \
           FOR EACH ROW EXECUTE FUNCTION broadcaster_capture('x'); \
         CREATE TABLE v (id int PRIMARY KEY); \
         CREATE TRIGGER nokey AFTER INSERT ON v \
           FOR EACH ROW EXECUTE FUNCTION broadcaster_capture('x', 'partition_key=nope'); \
         CREATE TABLE w (id int PRIMARY KEY, secret text); \
         CREATE TRIGGER keyout AFTER INSERT ON w \
           FOR EACH ROW EXECUTE FUNCTION broadcaster_capture('x', 'exclude=id'); \
         CREATE TABLE y (id int PRIMARY KEY, secret text); \
         CREATE TRIGGER typo AFTER INSERT ON y \
           FOR EACH ROW EXECUTE FUNCTION broadcaster_capture('x', 'exclude=secrte')",
    )
    .expect("triggers");
    for (sql, code) in [
        ("INSERT INTO t VALUES (1)", "22023"),
        ("INSERT INTO u VALUES (1)", "22023"),
        ("INSERT INTO v VALUES (1)", "42703"),
        // A key column's value would be the subject: it can't be left out.
        ("INSERT INTO w VALUES (1, 's')", "22023"),
        // A misspelt secret column would be sent: refused, not ignored.
        ("INSERT INTO y VALUES (1, 's')", "42703"),
    ] {
        let err = c.batch_execute(sql).expect_err("refused");
        assert_eq!(err.code().map(|c| c.code()), Some(code), "{sql}: {err:?}");
    }
    // Nothing half-written: the application's row went with the event.
    let rows: i64 = c
        .query_one(
            "SELECT (SELECT count(*) FROM t) + (SELECT count(*) FROM u)",
            &[],
        )
        .expect("count")
        .get(0);
    assert_eq!(rows, 0);
}

#[test]
fn excluded_columns_never_reach_the_broker() {
    let s = Setup::new(&[]);
    let mut c = s.cluster.connect();
    c.batch_execute(
        "CREATE TABLE accounts (id int PRIMARY KEY, name text, secret text, token text); \
         CREATE TRIGGER accounts_events AFTER INSERT OR UPDATE ON accounts \
           FOR EACH ROW EXECUTE FUNCTION broadcaster_capture('acct', 'exclude=secret, token'); \
         INSERT INTO accounts VALUES (1, 'ada', 'hunter2', 't0k3n'); \
         UPDATE accounts SET secret = 'hunter3', token = 't0k4n', name = 'ada l.'",
    )
    .expect("writes");
    let entries = s.redis.wait_entries(DEFAULT_STREAM, 2);
    for entry in &entries {
        let data = entry.get("data").expect("data");
        for secret in ["hunter", "t0k", "secret", "token"] {
            assert!(!data.contains(secret), "{secret} in {data}");
        }
    }
    let update: serde_json::Value =
        serde_json::from_str(entries[1].get("data").expect("data")).expect("JSON");
    assert_eq!(update["changes"], serde_json::json!({"name": "ada"}));
}
