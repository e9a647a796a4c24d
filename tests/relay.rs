//! End to end: committed events reach a real redis-server through the real worker of a real
//! cluster, with every attribute right; rolled-back ones never do; none twice, none lost.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use cloudevents::{AttributesReader, Data, Event};
use common::{Cluster, Redis, Setup, DEFAULT_STREAM};
use serde_json::json;

fn publish(c: &mut common::PgClient, ty: &str) -> String {
    c.query_one("SELECT broadcaster_publish($1)::text", &[&ty])
        .expect("publish")
        .get(0)
}

#[test]
fn published_and_inserted_events_arrive_as_binary_cloudevents() {
    let s = Setup::new(&[]);
    let mut c = s.cluster.connect();
    let published: String = c
        .query_one(
            "SELECT broadcaster_publish(type => 'order.created', data => '{\"order\": 42, \"total\": \"9.99\"}', \
             subject => 'order-42', partition_key => 'customer-7', \
             extensions => '{\"traceparent\": \"00-4bf92f3577b34da6-01\", \"tenant\": 3, \"vip\": true}')::text",
            &[],
        )
        .expect("publish")
        .get(0);
    let inserted: String = c
        .query_one(
            "INSERT INTO broadcaster_outbox (type, source, data, dataschema, time) \
             VALUES ('order.shipped', 'https://shop.example/orders', '[1, \"two\"]', \
                     'https://shop.example/schemas/shipped.json', '2026-11-27 10:00:00.5+02') \
             RETURNING id::text",
            &[],
        )
        .expect("insert")
        .get(0);

    let entries = s.redis.wait_entries(DEFAULT_STREAM, 2);
    assert_eq!(entries.len(), 2);
    let first = &entries[0];
    assert_eq!(first.get("ce_specversion"), Some("1.0"));
    assert_eq!(first.get("ce_id"), Some(published.as_str()));
    assert_eq!(first.get("ce_type"), Some("order.created"));
    assert_eq!(first.get("ce_source"), Some("postgresql:///postgres"));
    assert_eq!(first.get("ce_subject"), Some("order-42"));
    assert_eq!(first.get("ce_partitionkey"), Some("customer-7"));
    assert_eq!(first.get("ce_traceparent"), Some("00-4bf92f3577b34da6-01"));
    assert_eq!(first.get("ce_tenant"), Some("3"));
    assert_eq!(first.get("ce_vip"), Some("true"));
    assert_eq!(first.get("content-type"), Some("application/json"));
    assert_eq!(first.get("ce_dataschema"), None);
    let data: serde_json::Value =
        serde_json::from_str(first.get("data").expect("data")).expect("data is JSON");
    assert_eq!(data, json!({"order": 42, "total": "9.99"}));
    let time = first.get("ce_time").expect("ce_time");
    assert!(
        time.ends_with("+00:00") && time.contains('T'),
        "RFC 3339 with offset: {time}"
    );

    let second = &entries[1];
    assert_eq!(second.get("ce_id"), Some(inserted.as_str()));
    assert_eq!(second.get("ce_type"), Some("order.shipped"));
    assert_eq!(second.get("ce_source"), Some("https://shop.example/orders"));
    assert_eq!(
        second.get("ce_dataschema"),
        Some("https://shop.example/schemas/shipped.json")
    );
    assert_eq!(second.get("ce_time"), Some("2026-11-27T08:00:00.500+00:00"));
    // The data's bytes are the JSON text as written.
    assert_eq!(second.get("data"), Some(r#"[1, "two"]"#));
    assert_eq!(second.get("ce_subject"), None);
    assert_eq!(second.get("ce_partitionkey"), None);

    // Redis has the entries a moment before the relay's transaction commits their deletion.
    common::wait_for(
        "published rows retired from the outbox",
        common::DEADLINE,
        || {
            let left: i64 = c
                .query_one("SELECT count(*) FROM broadcaster_outbox", &[])
                .ok()?
                .get(0);
            (left == 0).then_some(())
        },
    );
}

#[test]
fn structured_mode_writes_one_cloudevents_json_field() {
    let s = Setup::new(&[("broadcaster.message_mode", "structured")]);
    let mut c = s.cluster.connect();
    let id: String = c
        .query_one(
            "SELECT broadcaster_publish('user.signed_up', '{\"user\": \"ada\"}', \
             source => '/accounts', partition_key => 'ada', extensions => '{\"region\": \"eu\"}')::text",
            &[],
        )
        .expect("publish")
        .get(0);
    c.batch_execute(
        "INSERT INTO broadcaster_outbox (type, datacontenttype, data) VALUES ('note', 'text/plain', '\"hello\"')",
    )
    .expect("insert");

    let entries = s.redis.wait_entries(DEFAULT_STREAM, 2);
    assert_eq!(entries[0].fields.len(), 2, "{:?}", entries[0].fields);
    assert_eq!(
        entries[0].get("content-type"),
        Some("application/cloudevents+json")
    );
    // Parsed by the official SDK.
    let event: Event = serde_json::from_str(entries[0].get("cloudevent").expect("cloudevent"))
        .expect("SDK parses it");
    assert_eq!(event.id(), id);
    assert_eq!(event.ty(), "user.signed_up");
    assert_eq!(event.source(), "/accounts");
    assert_eq!(event.datacontenttype(), Some("application/json"));
    assert_eq!(event.data(), Some(&Data::Json(json!({"user": "ada"}))));
    assert_eq!(
        event.extension("partitionkey").map(|v| v.to_string()),
        Some("ada".to_string())
    );
    assert_eq!(
        event.extension("region").map(|v| v.to_string()),
        Some("eu".to_string())
    );

    let note: Event = serde_json::from_str(entries[1].get("cloudevent").expect("cloudevent"))
        .expect("SDK parses it");
    assert_eq!(note.datacontenttype(), Some("text/plain"));
    assert_eq!(note.data(), Some(&Data::String("hello".into())));
}

#[test]
fn both_modes_carry_the_stored_data_text_and_every_attribute() {
    // Duplicate keys and formatting a parser would drop; an event with no data keeps its
    // content type.
    const TEXT: &str = r#"{"a":1,"a":2,  "n" : 1.50}"#;
    for (mode, stream) in [
        ("binary", "exact:binary"),
        ("structured", "exact:structured"),
    ] {
        let s = Setup::new(&[
            ("broadcaster.message_mode", mode),
            ("broadcaster.stream", stream),
        ]);
        let mut c = s.cluster.connect();
        c.execute("SELECT broadcaster_publish('exact', $1::text)", &[&TEXT])
            .expect("publish");
        c.batch_execute(
            "INSERT INTO broadcaster_outbox (type, datacontenttype) VALUES ('no.data', 'application/xml')",
        )
        .expect("insert");
        let entries = s.redis.wait_entries(stream, 2);
        // Both generations of the Python SDK read both events, every attribute included.
        let out = std::process::Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/clients/parse_with_sdks.py"
            ))
            .arg(s.redis.port.to_string())
            .arg(stream)
            .output()
            .expect("python3 runs (scripts/setup.sh installs cloudevents and redis)");
        assert!(
            out.status.success(),
            "{mode}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let parsed: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect();
        assert_eq!(parsed.len(), 2, "{mode}");
        let dup = json!({"a": 2, "n": 1.5});
        assert_eq!(parsed[0]["data"], json!([dup, dup]), "{mode}");
        assert_eq!(
            parsed[0]["datacontenttype"],
            json!(["application/json", "application/json"]),
            "{mode}"
        );
        assert_eq!(parsed[1]["data"], json!([null, null]), "{mode}");
        assert_eq!(
            parsed[1]["datacontenttype"],
            json!(["application/xml", "application/xml"]),
            "{mode}"
        );
        match mode {
            "binary" => {
                assert_eq!(entries[0].get("data"), Some(TEXT));
                assert_eq!(entries[1].get("data"), None);
                assert_eq!(entries[1].get("content-type"), Some("application/xml"));
            }
            _ => {
                let body = entries[0].get("cloudevent").expect("cloudevent");
                assert!(body.ends_with(&format!(r#""data":{TEXT}}}"#)), "{body}");
                let none: Event =
                    serde_json::from_str(entries[1].get("cloudevent").expect("cloudevent"))
                        .expect("SDK parses it");
                assert_eq!(none.datacontenttype(), Some("application/xml"));
                assert_eq!(none.data(), None);
            }
        }
    }
}

#[test]
fn per_event_stream_override() {
    let s = Setup::new(&[]);
    let mut c = s.cluster.connect();
    let id: String = c
        .query_one(
            "SELECT broadcaster_publish('audit', stream => 'audit-log')::text",
            &[],
        )
        .expect("publish")
        .get(0);
    let marker = publish(&mut c, "marker");
    assert_eq!(s.redis.wait_entries("audit-log", 1)[0].event_id(), id);
    assert_eq!(
        s.redis.wait_entries(DEFAULT_STREAM, 1)[0].event_id(),
        marker
    );
}

#[test]
fn rolled_back_events_never_leave() {
    let s = Setup::new(&[]);
    let mut c = s.cluster.connect();
    let mut rolled_back = HashSet::new();
    for _ in 0..20 {
        let mut tx = c.transaction().expect("begin");
        let id: String = tx
            .query_one("SELECT broadcaster_publish('doomed')::text", &[])
            .expect("publish")
            .get(0);
        tx.batch_execute("INSERT INTO broadcaster_outbox (type) VALUES ('doomed-insert')")
            .expect("insert");
        rolled_back.insert(id);
        tx.rollback().expect("rollback");
    }
    // A savepoint rolled back inside a committed transaction is gone too.
    let mut tx = c.transaction().expect("begin");
    tx.batch_execute(
        "SAVEPOINT s; SELECT broadcaster_publish('doomed-savepoint'); ROLLBACK TO SAVEPOINT s;",
    )
    .expect("savepoint");
    let kept: String = tx
        .query_one("SELECT broadcaster_publish('kept')::text", &[])
        .expect("publish")
        .get(0);
    tx.commit().expect("commit");

    let entries = s.redis.wait_entries(DEFAULT_STREAM, 1);
    // Give a wrongly relayed event every chance to show up.
    std::thread::sleep(Duration::from_secs(2));
    let entries_after = s.redis.entries(DEFAULT_STREAM);
    assert_eq!(entries_after.len(), 1, "{entries_after:?}");
    assert_eq!(entries[0].event_id(), kept);
    assert!(!rolled_back.contains(&entries[0].event_id()));
}

#[test]
fn ten_thousand_events_from_concurrent_producers_arrive_exactly_once() {
    concurrent_producers_arrive_exactly_once_in_order(&[]);
}

/// The same with batches of 20: the relay's transactions carry many full batches, each claim
/// passing over the rows its transaction deleted, while producers commit rows around them.
#[test]
fn concurrent_producers_arrive_exactly_once_in_order_in_small_batches() {
    concurrent_producers_arrive_exactly_once_in_order(&[("broadcaster.batch_size", "20")]);
}

fn concurrent_producers_arrive_exactly_once_in_order(settings: &[(&str, &str)]) {
    const PRODUCERS: usize = 4;
    const PER_PRODUCER: usize = 2_500;
    const PER_TX: usize = 25;
    let s = Setup::new(settings);
    let handles: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let mut c = s.cluster.connect();
            std::thread::spawn(move || {
                let mut ids = Vec::with_capacity(PER_PRODUCER);
                for chunk in 0..PER_PRODUCER / PER_TX {
                    let mut tx = c.transaction().expect("begin");
                    for i in 0..PER_TX {
                        let n = (chunk * PER_TX + i) as i64;
                        let key = format!("producer-{p}");
                        let id: String = tx
                            .query_one(
                                "SELECT broadcaster_publish('load', json_build_object('n', $1::bigint), \
                                 partition_key => $2)::text",
                                &[&n, &key],
                            )
                            .expect("publish")
                            .get(0);
                        ids.push(id);
                    }
                    tx.commit().expect("commit");
                }
                ids
            })
        })
        .collect();
    let produced: Vec<String> = handles
        .into_iter()
        .flat_map(|h| h.join().expect("producer"))
        .collect();
    assert_eq!(produced.len(), PRODUCERS * PER_PRODUCER);

    let entries = s.redis.wait_entries(DEFAULT_STREAM, produced.len());
    let delivered: Vec<String> = entries.iter().map(|e| e.event_id()).collect();
    let unique: HashSet<&String> = delivered.iter().collect();
    let produced_set: HashSet<&String> = produced.iter().collect();
    let duplicates = delivered.len() - unique.len();
    let lost = produced_set.difference(&unique).count();
    println!(
        "produced {} / delivered {} / duplicates {duplicates} / lost {lost}",
        produced.len(),
        delivered.len()
    );
    assert_eq!(duplicates, 0);
    assert_eq!(lost, 0);
    assert_eq!(unique, produced_set);

    // Each producer's key arrives in the order its transactions committed.
    let mut last: HashMap<String, i64> = HashMap::new();
    for e in &entries {
        let key = e.get("ce_partitionkey").expect("key").to_string();
        let n = serde_json::from_str::<serde_json::Value>(e.get("data").expect("data"))
            .expect("json")["n"]
            .as_i64()
            .expect("n");
        if let Some(prev) = last.insert(key.clone(), n) {
            assert!(n > prev, "{key}: {n} arrived after {prev}");
        }
    }
}

#[test]
fn one_key_written_by_successive_transactions_on_many_connections_keeps_commit_order() {
    let s = Setup::new(&[]);
    let mut conns: Vec<_> = (0..4).map(|_| s.cluster.connect()).collect();
    // Successive transactions, each on another connection, interleaved with other keys.
    for n in 0..400i64 {
        let c = &mut conns[(n % 4) as usize];
        c.execute(
            "SELECT broadcaster_publish('step', json_build_object('n', $1::bigint), partition_key => 'k')",
            &[&n],
        )
        .expect("publish");
        c.execute(
            "SELECT broadcaster_publish('noise', partition_key => $1)",
            &[&format!("other-{}", n % 7)],
        )
        .expect("publish");
    }
    let entries = s.redis.wait_entries(DEFAULT_STREAM, 800);
    let order: Vec<i64> = entries
        .iter()
        .filter(|e| e.get("ce_partitionkey") == Some("k"))
        .map(|e| {
            serde_json::from_str::<serde_json::Value>(e.get("data").expect("data")).expect("json")
                ["n"]
                .as_i64()
                .expect("n")
        })
        .collect();
    assert_eq!(order, (0..400).collect::<Vec<_>>());
}

#[test]
fn health_follows_redis_and_events_written_during_an_outage_arrive_after_it() {
    let mut s = Setup::new(&[
        ("broadcaster.poll_interval", "200ms"),
        ("broadcaster.retry_max_delay", "1s"),
    ]);
    s.cluster.wait_healthy(true, common::DEADLINE);
    let mut c = s.cluster.connect();
    let before = publish(&mut c, "before");
    s.redis.wait_entries(DEFAULT_STREAM, 1);

    let port = s.redis.port;
    s.redis.kill();
    // "Within a few seconds": the worker checks the broker every poll interval.
    s.cluster.wait_healthy(false, Duration::from_secs(5));
    let during: Vec<String> = (0..50).map(|_| publish(&mut c, "during")).collect();
    let pending: i64 = c
        .query_one(
            "SELECT count(*) FROM broadcaster_outbox o \
              WHERE NOT EXISTS (SELECT 1 FROM broadcaster_failures f WHERE f.seq = o.seq)",
            &[],
        )
        .expect("count")
        .get(0);
    assert_eq!(pending, 50, "an outage burns no attempts");

    s.redis = Redis::start_on(port);
    let entries = s.redis.wait_entries(DEFAULT_STREAM, 50);
    let ids: Vec<String> = entries.iter().map(|e| e.event_id()).collect();
    assert_eq!(
        ids, during,
        "every event written during the outage, in order"
    );
    assert!(!ids.contains(&before));
    s.cluster.wait_healthy(true, Duration::from_secs(10));
}

#[test]
fn worker_waits_for_the_extension_and_follows_reloads() {
    let redis = Redis::start();
    let cluster = Cluster::start(&redis.url(), &[("broadcaster.poll_interval", "200ms")]);
    // The relay looks, finds no extension, and leaves: the launcher says so once.
    common::wait_for("the launcher's note", common::DEADLINE, || {
        cluster
            .log()
            .contains("waiting for CREATE EXTENSION broadcaster in database \"postgres\"")
            .then_some(())
    });
    let mut c = cluster.connect();
    c.batch_execute("CREATE EXTENSION broadcaster")
        .expect("create extension");
    // The CREATE EXTENSION's commit starts the relay, before the launcher's 10 s re-check.
    let created = std::time::Instant::now();
    let first = publish(&mut c, "first");
    assert_eq!(redis.wait_entries(DEFAULT_STREAM, 1)[0].event_id(), first);
    assert!(
        created.elapsed() < Duration::from_secs(8),
        "relayed {:?} after CREATE EXTENSION",
        created.elapsed()
    );

    cluster.set_and_reload("broadcaster.stream", "renamed");
    // The reload reaches the worker asynchronously: publish until an event lands in the new stream.
    let moved = common::wait_for("events in the reloaded stream", common::DEADLINE, || {
        let id = publish(&mut c, "second");
        std::thread::sleep(Duration::from_millis(200));
        redis
            .entries("renamed")
            .iter()
            .any(|e| e.event_id() == id)
            .then_some(id)
    });
    assert!(!moved.is_empty());
    assert!(!cluster.log().contains("PANIC"));
}

#[test]
fn file_backend_appends_cloudevents_json_lines() {
    let redis = Redis::start();
    let path = format!("/tmp/bc-file-backend-{}.jsonl", std::process::id());
    let _ = std::fs::remove_file(&path);
    let cluster = Cluster::start(
        &redis.url(),
        &[
            ("broadcaster.backend", "file"),
            ("broadcaster.file_path", &path),
        ],
    );
    let mut c = cluster.connect();
    c.batch_execute("CREATE EXTENSION broadcaster")
        .expect("create extension");
    let ids: Vec<String> = (0..3).map(|_| publish(&mut c, "to.file")).collect();
    let lines = common::wait_for("three lines in the file", common::DEADLINE, || {
        let text = std::fs::read_to_string(&path).ok()?;
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        (lines.len() >= 3).then_some(lines)
    });
    let got: Vec<String> = lines
        .iter()
        .map(|l| {
            let e: Event = serde_json::from_str(l).expect("SDK parses the line");
            e.id().to_string()
        })
        .collect();
    assert_eq!(got, ids);
    assert_eq!(redis.len(DEFAULT_STREAM), 0);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn commits_wake_the_worker_without_waiting_for_the_poll() {
    // With an hour between polls, only the commit-time wake-up can move these events.
    let s = Setup::new(&[("broadcaster.poll_interval", "1h")]);
    let mut c = s.cluster.connect();
    let published = publish(&mut c, "woken.by.publish");
    assert_eq!(
        s.redis.wait_entries(DEFAULT_STREAM, 1)[0].event_id(),
        published
    );
    let inserted: String = c
        .query_one(
            "INSERT INTO broadcaster_outbox (type) VALUES ('woken.by.insert') RETURNING id::text",
            &[],
        )
        .expect("insert")
        .get(0);
    assert_eq!(
        s.redis.wait_entries(DEFAULT_STREAM, 2)[1].event_id(),
        inserted
    );
}

#[test]
fn worker_waits_for_its_database_without_a_crash_loop() {
    let redis = Redis::start();
    let cluster = Cluster::start(
        &redis.url(),
        &[
            ("broadcaster.database", "shop"),
            ("broadcaster.poll_interval", "200ms"),
        ],
    );
    // Several launcher checks pass while the database does not exist.
    std::thread::sleep(Duration::from_secs(3));
    cluster
        .connect()
        .batch_execute("CREATE DATABASE shop")
        .expect("create database");
    let mut shop = cluster.connect_to("shop");
    shop.batch_execute("CREATE EXTENSION broadcaster")
        .expect("create extension");
    let id = publish(&mut shop, "in.shop");
    assert_eq!(redis.wait_entries("broadcaster:shop", 1)[0].event_id(), id);
    let log = cluster.log();
    assert_eq!(
        log.matches("waiting for database \"shop\"").count(),
        1,
        "one line while waiting:\n{log}"
    );
    assert!(!log.contains("FATAL"), "no crash loop:\n{log}");
}

#[test]
fn the_relay_vacuums_the_outbox_behind_itself() {
    // Autovacuum off: every VACUUM of the outbox is the relay's. Without it, the index entries of
    // delivered rows stay until autovacuum, and each claim walks over them.
    let s = Setup::new(&[("autovacuum", "off")]);
    let mut c = s.cluster.connect();
    let pid = s.cluster.worker_pid();
    c.batch_execute(
        "INSERT INTO broadcaster_outbox (type, partition_key) \
         SELECT 'bulk', 'k' || (g % 10) FROM generate_series(1, 5000) g",
    )
    .expect("insert");
    assert_eq!(s.redis.wait_entries(DEFAULT_STREAM, 5000).len(), 5000);
    let vacuumed = common::wait_for("the relay's VACUUM", Duration::from_secs(30), || {
        let row = c
            .query_one(
                "SELECT vacuum_count, n_dead_tup FROM pg_stat_user_tables \
                 WHERE relname = 'broadcaster_outbox'",
                &[],
            )
            .expect("stats");
        let (count, dead): (i64, i64) = (row.get(0), row.get(1));
        (count > 0).then_some(dead)
    });
    assert!(
        vacuumed < 1000,
        "{vacuumed} dead rows left after the VACUUM"
    );
    // Still the same relay: the VACUUM ran inside it without ending it.
    assert_eq!(s.cluster.worker_pid(), pid);
    assert_eq!(publish(&mut c, "after.vacuum").len(), 36);
    assert_eq!(s.redis.wait_entries(DEFAULT_STREAM, 5001).len(), 5001);
}
