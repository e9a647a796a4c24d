//! The README's consumer example, run as it stands against a live relay: a consumer group
//! reads every event once, de-duplicates a replayed one on `ce_id`, and acknowledges all.

mod common;

use std::process::Command;

use common::{Setup, DEFAULT_STREAM};

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
    let s = Setup::new(&[("broadcaster.retention", "1h")]);
    let mut c = s.cluster.connect();
    let ids: Vec<String> = (1..=3)
        .map(|n| {
            c.query_one(
                "SELECT broadcaster_publish('invoice.paid', json_build_object('n', $1::int))::text",
                &[&n],
            )
            .expect("publish")
            .get(0)
        })
        .collect();
    s.redis.wait_entries(DEFAULT_STREAM, 3);
    // The first again, as a replay sends it: same ce_id, a new entry.
    c.execute(
        "SELECT broadcaster_replay(ARRAY[$1::text::uuid])",
        &[&ids[0]],
    )
    .expect("replay");
    s.redis.wait_entries(DEFAULT_STREAM, 4);

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
    let mut r = s.redis.connection();
    let pending: Vec<redis::Value> = redis::cmd("XPENDING")
        .arg(DEFAULT_STREAM)
        .arg("billing")
        .query(&mut r)
        .expect("XPENDING");
    assert_eq!(
        redis::from_redis_value_ref::<i64>(&pending[0]).expect("a count"),
        0
    );
}
