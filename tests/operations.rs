//! Operating it: several databases served by one cluster, and status from SQL.

mod common;

use std::time::Duration;

use common::{Cluster, PgClient, Redis};

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

    // Counters survive a relay's restart: the launcher starts a new one.
    let old_pid: i32 = shop
        .query_one(
            "SELECT pid FROM broadcaster_status WHERE database = 'shop'",
            &[],
        )
        .expect("pid")
        .get(0);
    shop.query_one("SELECT pg_terminate_backend($1)", &[&old_pid])
        .expect("terminate");
    let published = common::wait_for("a new shop relay", common::DEADLINE, || {
        let row = shop
            .query_one(
                "SELECT pid, published FROM broadcaster_status WHERE database = 'shop'",
                &[],
            )
            .ok()?;
        let pid: Option<i32> = row.get(0);
        (pid.is_some() && pid != Some(old_pid)).then(|| row.get::<_, i64>(1))
    });
    assert_eq!(published, 5);
    let after = publish(&mut shop, "after.restart");
    assert_eq!(
        redis.wait_entries("broadcaster:shop", 6)[5].event_id(),
        after
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

#[test]
fn publishes_over_tls_trusting_the_configured_ca() {
    let dir = std::path::PathBuf::from(format!("/tmp/bc-tls-{}", std::process::id()));
    common::make_certificates(&dir);
    let path = |f: &str| dir.join(f).to_string_lossy().into_owned();
    let tls_port = common::free_port();
    let redis = Redis::start_tls(
        tls_port,
        &path("server.pem"),
        &path("server.key"),
        &path("ca.pem"),
    );
    let ca = path("ca.pem");
    let cluster = Cluster::start(
        &format!("rediss://127.0.0.1:{tls_port}"),
        &[
            ("broadcaster.redis_tls_ca_file", ca.as_str()),
            ("broadcaster.poll_interval", "200ms"),
        ],
    );
    let mut c = cluster.connect();
    c.batch_execute("CREATE EXTENSION broadcaster")
        .expect("extension");
    let id = publish(&mut c, "over.tls");
    assert_eq!(
        redis.wait_entries(common::DEFAULT_STREAM, 1)[0].event_id(),
        id
    );
    cluster.wait_healthy(true, common::DEADLINE);

    // Without the CA, the server's certificate is not trusted: no connection, no health.
    cluster.set_and_reload("broadcaster.redis_tls_ca_file", "");
    cluster.wait_healthy(false, Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn mutual_tls_presents_the_configured_client_certificate() {
    let dir = std::path::PathBuf::from(format!("/tmp/bc-mtls-{}", std::process::id()));
    common::make_certificates(&dir);
    let path = |f: &str| dir.join(f).to_string_lossy().into_owned();
    let tls_port = common::free_port();
    let redis = Redis::start_mutual_tls(
        tls_port,
        &path("server.pem"),
        &path("server.key"),
        &path("ca.pem"),
    );
    let (ca, cert, key) = (path("ca.pem"), path("client.pem"), path("client.key"));
    let cluster = Cluster::start(
        &format!("rediss://127.0.0.1:{tls_port}"),
        &[
            ("broadcaster.redis_tls_ca_file", ca.as_str()),
            ("broadcaster.redis_tls_cert_file", cert.as_str()),
            ("broadcaster.redis_tls_key_file", key.as_str()),
            ("broadcaster.poll_interval", "200ms"),
            ("broadcaster.retry_max_delay", "1s"),
        ],
    );
    let mut c = cluster.connect();
    c.batch_execute("CREATE EXTENSION broadcaster")
        .expect("extension");
    let id = publish(&mut c, "over.mutual.tls");
    assert_eq!(
        redis.wait_entries(common::DEFAULT_STREAM, 1)[0].event_id(),
        id
    );
    cluster.wait_healthy(true, common::DEADLINE);

    // Without a client certificate the server refuses the relay: events wait, health says so.
    cluster.set_and_reload("broadcaster.redis_tls_cert_file", "");
    cluster.set_and_reload("broadcaster.redis_tls_key_file", "");
    cluster.wait_healthy(false, Duration::from_secs(10));
    let waiting = publish(&mut c, "waits.for.the.certificate");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(redis.len(common::DEFAULT_STREAM), 1);
    // Half a pair is a configuration error, said as such (within the 10 s the relay's outage
    // lines are spaced by).
    let offset = cluster.log_len();
    cluster.set_and_reload("broadcaster.redis_tls_cert_file", &cert);
    common::wait_for("the configuration error", common::DEADLINE, || {
        cluster
            .log_since(offset)
            .contains("go together")
            .then_some(())
    });
    cluster.set_and_reload("broadcaster.redis_tls_key_file", &key);
    let entries = redis.wait_entries(common::DEFAULT_STREAM, 2);
    assert_eq!(entries[1].event_id(), waiting);
    // Settings that name the key's file are superuser-only, like the URL.
    let mut nosy = cluster.connect_as_new_role("nosy");
    for setting in [
        "redis_tls_cert_file",
        "redis_tls_key_file",
        "redis_tls_ca_file",
    ] {
        let err = nosy
            .query_one(&format!("SHOW broadcaster.{setting}"), &[])
            .expect_err("superuser only");
        assert_eq!(
            err.code(),
            Some(&postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{setting}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn stream_prefix_confines_the_keys_producers_can_name_and_the_acl_agrees() {
    let redis = Redis::start();
    // The relay's Redis user may write to app:* only (the README's ACL).
    let mut admin = redis.connection();
    redis::cmd("ACL")
        .arg("SETUSER")
        .arg("relay")
        .arg("on")
        .arg(">s3cret")
        .arg("resetkeys")
        .arg("~app:*")
        .arg("resetchannels")
        .arg("-@all")
        .arg("+xadd")
        .arg("+multi")
        .arg("+exec")
        .arg("+ping")
        .arg("+info")
        .arg("+evalsha")
        .arg("+eval")
        .arg("+script|load")
        .query::<()>(&mut admin)
        .expect("ACL SETUSER");
    let cluster = Cluster::start(
        &format!("redis://relay:s3cret@127.0.0.1:{}", redis.port),
        &[
            ("broadcaster.stream", "app:events"),
            ("broadcaster.stream_prefix", "app:"),
            ("broadcaster.max_attempts", "1"),
            ("broadcaster.poll_interval", "200ms"),
        ],
    );
    let mut c = cluster.connect();
    c.batch_execute("CREATE EXTENSION broadcaster")
        .expect("extension");
    let default = publish(&mut c, "to.the.default");
    let named: String = c
        .query_one(
            "SELECT broadcaster_publish('to.orders', stream => 'app:orders')::text",
            &[],
        )
        .expect("inside the prefix")
        .get(0);
    assert_eq!(redis.wait_entries("app:events", 1)[0].event_id(), default);
    assert_eq!(redis.wait_entries("app:orders", 1)[0].event_id(), named);

    // Outside it: refused when written, whoever the producer is.
    for sql in [
        "SELECT broadcaster_publish('t', stream => 'billing:payments')",
        "INSERT INTO broadcaster_outbox (type, stream) VALUES ('t', 'billing:payments')",
    ] {
        let err = c.query_one(sql, &[]).expect_err("outside the prefix");
        assert_eq!(
            err.code(),
            Some(&postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{sql}"
        );
        let message = err.as_db_error().map(|e| e.message()).unwrap_or_default();
        assert!(message.contains("stream_prefix"), "{message}");
    }
    // Past a disabled trigger, the relay refuses it itself; and with no prefix set, Redis's
    // ACL does (NOPERM): either way the event goes dead, and the key is never written.
    c.batch_execute(
        "ALTER TABLE broadcaster_outbox DISABLE TRIGGER broadcaster_outbox_accept; \
         INSERT INTO broadcaster_outbox (type, stream) VALUES ('past.trigger', 'billing:payments'); \
         ALTER TABLE broadcaster_outbox ENABLE ALWAYS TRIGGER broadcaster_outbox_accept",
    )
    .expect("past the trigger");
    let dead_error = |c: &mut PgClient, ty: &str| {
        common::wait_for(&format!("{ty} dead"), common::DEADLINE, || {
            c.query_opt(
                "SELECT last_error FROM broadcaster_dead_events WHERE type = $1",
                &[&ty],
            )
            .ok()
            .flatten()
            .map(|r| r.get::<_, String>(0))
        })
    };
    let error = dead_error(&mut c, "past.trigger");
    assert!(error.contains("stream_prefix"), "{error}");
    cluster.set_and_reload("broadcaster.stream_prefix", "");
    // The reload reaches the relay asynchronously: until it has, the relay refuses the event
    // itself. Publish until Redis's ACL is what refuses one.
    let error = common::wait_for("a refusal by Redis's ACL", common::DEADLINE, || {
        let ty: String = c
            .query_one(
                "SELECT 'acl.' || pg_catalog.gen_random_uuid() \
                   FROM (SELECT broadcaster_publish('probe', stream => 'app:probe')) p",
                &[],
            )
            .ok()?
            .get(0);
        c.query_one(
            "SELECT broadcaster_publish($1, stream => 'billing:payments')",
            &[&ty],
        )
        .ok()?;
        let error = dead_error(&mut c, &ty);
        error.contains("NOPERM").then_some(error)
    });
    assert!(error.contains("NOPERM"), "{error}");
    assert_eq!(redis.len("billing:payments"), 0);
}
