//! The README's consumer examples, run as they stand against a live relay: a consumer group
//! reads every event once, de-duplicates a replayed one on `ce_id`, and acknowledges all. The
//! Python one is extracted from the README and run; the Rust one is this file's `consume`, and
//! the README must show it verbatim.

mod common;

use std::process::Command;

use common::{Setup, DEFAULT_STREAM};

// README: rust consumer begins
use std::collections::HashSet;

use cloudevents::{AttributesReader, Event, EventBuilder, EventBuilderV10};
use redis::streams::{StreamReadOptions, StreamReadReply};
use redis::Commands;

/// Reads `stream` as consumer `worker-1` of group `billing`, handles each event once (by its
/// `ce_id`: delivery is at least once) and acknowledges every entry. Returns what it handled.
fn consume(
    con: &mut redis::Connection,
    stream: &str,
) -> Result<Vec<Event>, Box<dyn std::error::Error>> {
    // BUSYGROUP when the group exists already.
    let _: redis::RedisResult<()> = con.xgroup_create_mkstream(stream, "billing", "0");
    let mut seen = HashSet::new(); // in production: kept with what handling writes
    let mut handled = Vec::new();
    loop {
        let options = StreamReadOptions::default()
            .group("billing", "worker-1")
            .count(100)
            .block(2000);
        let reply: StreamReadReply = con.xread_options(&[stream], &[">"], &options)?;
        if reply.keys.is_empty() {
            break; // a real consumer keeps waiting
        }
        for entry in reply.keys.into_iter().flat_map(|key| key.ids) {
            // Binary mode: one ce_<attribute> field each, content-type and data.
            let mut event = EventBuilderV10::new();
            let mut dataschema = None;
            for (name, value) in &entry.map {
                let value: String = redis::from_redis_value_ref(value)?;
                event = match name.strip_prefix("ce_") {
                    Some("id") => event.id(value),
                    Some("source") => event.source(value),
                    Some("type") => event.ty(value),
                    Some("time") => event.time(value.as_str()),
                    Some("subject") => event.subject(value),
                    Some("dataschema") => {
                        dataschema = Some(value);
                        event
                    }
                    Some("specversion") | None => event,
                    Some(extension) => event.extension(extension, value),
                };
            }
            if let (Some(content_type), Some(data)) = (
                entry.get::<String>("content-type"),
                entry.get::<String>("data"),
            ) {
                // JSON content types carry JSON; any other, the bare text.
                let json =
                    content_type.starts_with("application/json") || content_type.contains("+json");
                let data: cloudevents::Data = if json {
                    cloudevents::Data::Json(serde_json::from_str(&data)?)
                } else {
                    cloudevents::Data::String(data)
                };
                event = match dataschema {
                    Some(schema) => event.data_with_schema(content_type, schema.as_str(), data),
                    None => event.data(content_type, data),
                };
            }
            let event = event.build()?;
            if seen.insert(event.id().to_string()) {
                handled.push(event);
            }
            let _: i64 = con.xack(stream, "billing", &[&entry.id])?;
        }
    }
    Ok(handled)
}
// README: rust consumer ends

/// A relay keeping what it publishes, three events published and the first replayed: four
/// entries, three ids. Returns the setup and the ids.
fn three_events_and_a_replay() -> (Setup, Vec<String>) {
    let s = Setup::new(&[("broadcaster.retention", "1h")]);
    let mut c = s.cluster.connect();
    let ids: Vec<String> = (1..=3)
        .map(|n| {
            c.query_one(
                "SELECT broadcaster_publish('invoice.paid', json_build_object('n', $1::int), \
                 extensions => '{\"tenant\": \"acme\"}')::text",
                &[&n],
            )
            .expect("publish")
            .get(0)
        })
        .collect();
    s.redis.wait_entries(DEFAULT_STREAM, 3);
    // The first again, as a replay sends it: same ce_id, a new entry. Its retained copy is
    // committed with the relay's transaction, which may end after Redis has the entries.
    common::wait_for("the retained copy", common::DEADLINE, || {
        let replayed: i64 = c
            .query_one(
                "SELECT broadcaster_replay(ARRAY[$1::text::uuid])",
                &[&ids[0]],
            )
            .ok()?
            .get(0);
        (replayed == 1).then_some(())
    });
    s.redis.wait_entries(DEFAULT_STREAM, 4);
    (s, ids)
}

/// Entries read by group `billing` and not acknowledged.
fn pending(con: &mut redis::Connection) -> i64 {
    let reply: Vec<redis::Value> = redis::cmd("XPENDING")
        .arg(DEFAULT_STREAM)
        .arg("billing")
        .query(con)
        .expect("XPENDING");
    redis::from_redis_value_ref::<i64>(&reply[0]).expect("a count")
}

/// The Python block that follows the marker in the README.
fn readme_example() -> String {
    let readme = include_str!("../README.md");
    let marker = "<!-- consumer example: run by tests/consumer.rs -->";
    let after = &readme[readme.find(marker).expect("the README's marker") + marker.len()..];
    let start = after.find("```python\n").expect("a python block") + "```python\n".len();
    let end = after[start..].find("```").expect("its end");
    after[start..start + end].to_string()
}

#[test]
fn the_readme_consumer_reads_each_event_once_and_acknowledges_all() {
    let (s, ids) = three_events_and_a_replay();

    let script = std::env::temp_dir().join(format!("bc-consumer-{}.py", std::process::id()));
    std::fs::write(&script, readme_example()).expect("write the example");
    let out = Command::new("python3")
        .arg(&script)
        .env("REDIS_PORT", s.redis.port.to_string())
        .output()
        .expect("python3 runs (scripts/setup.sh installs redis and cloudevents)");
    let _ = std::fs::remove_file(&script);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let handled: Vec<&str> = stdout.lines().collect();
    assert_eq!(handled.len(), 3, "each event handled once: {handled:?}");
    for (line, id) in handled.iter().zip(&ids) {
        assert!(line.starts_with(&format!("invoice.paid {id} ")), "{line}");
    }
    assert!(handled[0].ends_with("{'n': 1}"), "{}", handled[0]);
    // Every entry, the duplicate too, acknowledged: nothing pending in the group.
    assert_eq!(pending(&mut s.redis.connection()), 0);
}

#[test]
fn the_readme_rust_consumer_reads_each_event_once_and_is_the_readmes() {
    let source = include_str!("consumer.rs");
    let begin = "// README: rust consumer begins\n";
    let start = source.find(begin).expect("begin marker") + begin.len();
    let end = source
        .find("// README: rust consumer ends")
        .expect("end marker");
    assert!(
        include_str!("../README.md").contains(&source[start..end]),
        "the README's Rust consumer is not this file's `consume`"
    );

    let (s, ids) = three_events_and_a_replay();
    let mut con = s.redis.connection();
    let handled = consume(&mut con, DEFAULT_STREAM).expect("consume");
    let got: Vec<&str> = handled.iter().map(|e| e.id()).collect();
    assert_eq!(got, ids.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(
        handled[0].data(),
        Some(&cloudevents::Data::Json(serde_json::json!({"n": 1})))
    );
    assert_eq!(
        handled[0].extension("tenant").map(|v| v.to_string()),
        Some("acme".to_string())
    );
    assert_eq!(pending(&mut con), 0);
}
