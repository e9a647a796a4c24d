//! Operating it: several databases served by one cluster, and status from SQL.

mod common;

use std::time::Duration;

use common::{Cluster, Redis};

fn publish(c: &mut common::PgClient, ty: &str) -> String {
    c.query_one("SELECT broadcaster_publish($1)::text", &[&ty])
        .expect("publish")
        .get(0)
}

#[test]
fn two_databases_are_served_at_once_and_kept_apart() {
    let redis = Redis::start();
    // An hour between polls: each database's commits must wake its own relay.
    let cluster = Cluster::start(
        &redis.url(),
        &[
            ("broadcaster.database", "shop"),
            ("broadcaster.poll_interval", "1h"),
        ],
    );
    let mut admin = cluster.connect();
    for db in ["shop", "billing"] {
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .expect("database");
    }
    // A second database needs a reload, not a restart.
    cluster.set_and_reload("broadcaster.database", "shop, billing");
    let mut shop = cluster.connect_to("shop");
    let mut billing = cluster.connect_to("billing");
    shop.batch_execute("CREATE EXTENSION broadcaster")
        .expect("extension");
    billing
        .batch_execute("CREATE EXTENSION broadcaster")
        .expect("extension");

    let shop_ids: Vec<String> = (0..5).map(|_| publish(&mut shop, "shop.event")).collect();
    let billing_ids: Vec<String> = (0..3)
        .map(|_| publish(&mut billing, "billing.event"))
        .collect();
    let shop_got: Vec<String> = redis
        .wait_entries("broadcaster:shop", 5)
        .iter()
        .map(|e| e.event_id())
        .collect();
    let billing_got: Vec<String> = redis
        .wait_entries("broadcaster:billing", 3)
        .iter()
        .map(|e| e.event_id())
        .collect();
    assert_eq!(shop_got, shop_ids);
    assert_eq!(billing_got, billing_ids);
    let sources: Vec<String> = redis
        .entries("broadcaster:billing")
        .iter()
        .map(|e| e.get("ce_source").unwrap_or_default().to_string())
        .collect();
    assert!(
        sources.iter().all(|s| s == "postgresql:///billing"),
        "{sources:?}"
    );

    // Status: a row per relay; the outbox counts only for the current database.
    let rows = common::wait_for("both relays healthy", common::DEADLINE, || {
        let rows = shop
            .query(
                "SELECT database::text, state, healthy, published, pending, dead \
                 FROM broadcaster_status ORDER BY database",
                &[],
            )
            .ok()?;
        rows.iter().all(|r| r.get::<_, bool>(2)).then_some(rows)
    });
    assert_eq!(rows.len(), 2);
    let billing_row = &rows[0];
    let shop_row = &rows[1];
    assert_eq!(billing_row.get::<_, String>(0), "billing");
    assert_eq!(shop_row.get::<_, String>(0), "shop");
    assert_eq!(shop_row.get::<_, String>(1), "running");
    assert_eq!(shop_row.get::<_, i64>(3), 5);
    assert_eq!(billing_row.get::<_, i64>(3), 3);
    assert_eq!(shop_row.get::<_, Option<i64>>(4), Some(0));
    assert_eq!(shop_row.get::<_, Option<i64>>(5), Some(0));
    assert_eq!(
        billing_row.get::<_, Option<i64>>(4),
        None,
        "another database's outbox"
    );

    // The postgres database has no relay, hence no health.
    let healthy: bool = admin
        .query_one("SELECT broadcaster_health()", &[])
        .map(|r| r.get(0))
        .unwrap_or(false);
    assert!(!healthy);
}

#[test]
fn status_reports_pending_dead_and_the_last_error() {
    let redis = Redis::start();
    let cluster = Cluster::start(
        &redis.url(),
        &[
            ("broadcaster.max_attempts", "1"),
            ("broadcaster.poll_interval", "200ms"),
        ],
    );
    let mut c = cluster.connect();
    c.batch_execute("CREATE EXTENSION broadcaster")
        .expect("extension");
    let mut r = redis.connection();
    redis::cmd("SET")
        .arg("poisoned")
        .arg("x")
        .query::<()>(&mut r)
        .expect("SET");
    c.query_one(
        "SELECT broadcaster_publish('bad', stream => 'poisoned')",
        &[],
    )
    .expect("publish");
    let (dead, failed, error): (i64, i64, String) =
        common::wait_for("the dead event in the status", common::DEADLINE, || {
            let row = c
                .query_one(
                    "SELECT dead, failed, last_error FROM broadcaster_status",
                    &[],
                )
                .ok()?;
            let dead: Option<i64> = row.get(0);
            (dead == Some(1)).then(|| {
                let error: Option<String> = row.get(2);
                (1, row.get(1), error.unwrap_or_default())
            })
        });
    assert_eq!(dead, 1);
    assert_eq!(failed, 1);
    assert!(error.contains("WRONGTYPE"), "{error}");

    // Pending events and their age, while Redis is away.
    drop(r);
    let mut redis = redis;
    redis.kill();
    c.query_one("SELECT broadcaster_publish('waiting')", &[])
        .expect("publish");
    std::thread::sleep(Duration::from_millis(1200));
    let row = c
        .query_one(
            "SELECT pending, extract(epoch FROM oldest_pending_age)::float8 FROM broadcaster_status",
            &[],
        )
        .expect("status");
    assert_eq!(row.get::<_, Option<i64>>(0), Some(1));
    let age: f64 = row.get::<_, Option<f64>>(1).unwrap_or(0.0);
    assert!(age >= 1.0, "oldest pending age {age}");
}

#[test]
fn retained_events_replay_with_the_same_ids_and_are_purged_in_time() {
    let redis = Redis::start();
    let cluster = Cluster::start(
        &redis.url(),
        &[
            ("broadcaster.retention", "1h"),
            ("broadcaster.poll_interval", "200ms"),
        ],
    );
    let mut c = cluster.connect();
    c.batch_execute("CREATE EXTENSION broadcaster")
        .expect("extension");
    let ids: Vec<String> = (0..3).map(|_| publish(&mut c, "kept")).collect();
    let other = publish(&mut c, "other.type");
    redis.wait_entries(common::DEFAULT_STREAM, 4);
    let kept: i64 = common::wait_for("published events retained", common::DEADLINE, || {
        let n: i64 = c
            .query_one("SELECT count(*) FROM broadcaster_published", &[])
            .ok()?
            .get(0);
        (n == 4).then_some(n)
    });
    assert_eq!(kept, 4);

    // By id: new deliveries, same ce_id, original order.
    let replayed: i64 = c
        .query_one(
            "SELECT broadcaster_replay(ARRAY[$1::text::uuid, $2::text::uuid])",
            &[&ids[0], &ids[2]],
        )
        .expect("replay")
        .get(0);
    assert_eq!(replayed, 2);
    let entries = redis.wait_entries(common::DEFAULT_STREAM, 6);
    let again: Vec<String> = entries[4..].iter().map(|e| e.event_id()).collect();
    assert_eq!(again, [ids[0].clone(), ids[2].clone()]);

    // By time range and type.
    let replayed: i64 = c
        .query_one(
            "SELECT broadcaster_replay(now() - interval '1 hour', event_type => 'other.type')",
            &[],
        )
        .expect("replay")
        .get(0);
    assert_eq!(replayed, 1);
    assert_eq!(
        redis.wait_entries(common::DEFAULT_STREAM, 7)[6].event_id(),
        other
    );

    // A replayed event is retained again, yet replays once.
    common::wait_for("replays retained too", common::DEADLINE, || {
        let n: i64 = c
            .query_one("SELECT count(*) FROM broadcaster_published", &[])
            .ok()?
            .get(0);
        (n == 7).then_some(())
    });
    let replayed: i64 = c
        .query_one(
            "SELECT broadcaster_replay(ARRAY[$1::text::uuid])",
            &[&ids[0]],
        )
        .expect("replay")
        .get(0);
    assert_eq!(replayed, 1);
    assert_eq!(
        redis.wait_entries(common::DEFAULT_STREAM, 8)[7].event_id(),
        ids[0]
    );

    // Bad arguments are refused.
    let err = c
        .query_one(
            "SELECT broadcaster_replay(now(), now() - interval '1 day')",
            &[],
        )
        .expect_err("since after until");
    assert_eq!(
        err.code(),
        Some(&postgres::error::SqlState::INVALID_PARAMETER_VALUE)
    );

    // A short retention: the relay purges what is older.
    cluster.set_and_reload("broadcaster.retention", "1s");
    common::wait_for("retained events purged", common::DEADLINE, || {
        let n: i64 = c
            .query_one("SELECT count(*) FROM broadcaster_published", &[])
            .ok()?
            .get(0);
        (n == 0).then_some(())
    });
}
