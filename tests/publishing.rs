//! Publishing the way applications write it: JSON data passed by Python's drivers and ORMs
//! (psycopg 3, SQLAlchemy 2, Django) reaches Redis as the data they meant.

mod common;

use std::process::Command;

use common::{Setup, DEFAULT_STREAM};

#[test]
fn json_from_psycopg_sqlalchemy_and_django_arrives_as_sent() {
    let s = Setup::new(&[]);
    let out = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/clients/publish_from_drivers.py"
        ))
        .arg(s.cluster.port.to_string())
        .output()
        .expect("python3 runs (scripts/setup.sh installs psycopg, SQLAlchemy and Django)");
    assert!(
        out.status.success(),
        "the drivers' script failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sent: Vec<(String, String, serde_json::Value)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| {
            let mut parts = line.splitn(3, '\t');
            let via = parts.next().unwrap_or_default().to_string();
            let id = parts.next().unwrap_or_default().to_string();
            let data = serde_json::from_str(parts.next().unwrap_or("null")).expect("JSON data");
            (via, id, data)
        })
        .collect();
    // psycopg's three wrappers, by position and by name; SQLAlchemy's two types; Django's.
    assert_eq!(sent.len(), 9, "{sent:?}");
    let entries = s.redis.wait_entries(DEFAULT_STREAM, sent.len());
    for (via, id, data) in &sent {
        let entry = entries
            .iter()
            .find(|e| e.event_id() == *id)
            .unwrap_or_else(|| panic!("{via}: {id} not in the stream"));
        let got: serde_json::Value =
            serde_json::from_str(entry.get("data").expect("a data field")).expect("JSON");
        assert_eq!(&got, data, "{via}");
        assert_eq!(entry.get("content-type"), Some("application/json"), "{via}");
    }
}
