//! The Redis backend without a server: encoding, reply reading, options.

use proptest::prelude::*;
use redis::{Client, Cmd};
use serde_json::json;

use super::encode::{arg_bytes, write_entry, BATCH_SCRIPT};
use super::reply::{classify_message, entry_outcome, script_entry_outcome, server_version};
use super::*;
use crate::backend::binding::Mode;
use crate::backend::{Config, Kind, Options};

fn event() -> OutboxEvent {
    OutboxEvent {
        id: "7d2c5bd4-4f7e-4a53-8d4c-5d1d7a1c0e11".into(),
        ty: "order.created".into(),
        source: "/shop".into(),
        subject: Some("order-1".into()),
        time: "2026-11-27T07:00:00Z".into(),
        datacontenttype: "application/json".into(),
        dataschema: None,
        data: Some(r#"{"n": 1}"#.into()),
        partition_key: Some("c-1".into()),
        extensions: json!({"tenant": "acme"})
            .as_object()
            .cloned()
            .unwrap_or_default(),
        stream: None,
    }
}

type Fields = Vec<(String, Vec<u8>)>;

#[test]
fn a_key_the_acl_forbids_is_the_events_fault_a_command_is_an_outage() {
    let reject = |m: &str| matches!(classify_message(m.into()), Outcome::Rejected(_));
    // Redis 7.0 and 7.2+ wordings for a key outside the user's `~pattern`.
    assert!(reject(
        "NOPERM this user has no permissions to access one of the keys used as arguments"
    ));
    assert!(reject("NOPERM No permissions to access a key"));
    // A command the user may not run, and the other outages, stop the batch.
    assert!(!reject(
        "NOPERM this user has no permissions to run the 'xadd' command"
    ));
    assert!(!reject(
        "NOPERM User relay has no permissions to run the 'xadd' command"
    ));
    assert!(!reject(
        "OOM command not allowed when used memory > 'maxmemory'."
    ));
    assert!(reject(
        "WRONGTYPE Operation against a key holding the wrong kind of value"
    ));
}

/// Text a producer may write into a column: anything, with the characters that break
/// encoders more likely than chance makes them.
fn hostile_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-z.]{1,12}",
        proptest::collection::vec(
            prop_oneof![
                Just('\t'),
                Just('\n'),
                Just('\u{0}'),
                Just('\u{7f}'),
                Just('\u{85}'),
                Just('\u{fdd0}'),
                Just('\u{fffe}'),
                Just('\u{10ffff}'),
                Just('"'),
                Just('\\'),
                any::<char>(),
            ],
            0..24
        )
        .prop_map(|cs| cs.into_iter().collect()),
    ]
}

/// `data` as PostgreSQL's json type may hold it: JSON of arbitrary strings and numbers,
/// lone surrogate escapes, nesting around the parser's limit, long strings, and garbage.
fn hostile_data() -> impl Strategy<Value = String> {
    prop_oneof![
        hostile_text().prop_map(|s| serde_json::to_string(&json!({ "s": s })).unwrap_or_default()),
        hostile_text().prop_map(|s| serde_json::to_string(&s).unwrap_or_default()),
        Just(r#"{"s":"\ud83d"}"#.to_string()),
        Just(r#""\udc00\ud83d""#.to_string()),
        Just(r#"{"s":"\ud83d\ude00"}"#.to_string()),
        Just(r#"{"a":1,"a":2}"#.to_string()),
        Just("1e999999".to_string()),
        Just("-0.000000000000000000000000000001".to_string()),
        (0usize..300).prop_map(|depth| format!("{}1{}", "[".repeat(depth), "]".repeat(depth))),
        (0usize..200_000).prop_map(|n| format!("\"{}\"", "x".repeat(n))),
        hostile_text(),
    ]
}

fn hostile_extensions() -> impl Strategy<Value = serde_json::Value> {
    let value = prop_oneof![
        hostile_text().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<i32>().prop_map(serde_json::Value::from),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        Just(serde_json::Value::Null),
        Just(json!([1])),
    ];
    proptest::collection::btree_map(prop_oneof!["[a-z0-9]{1,20}", hostile_text()], value, 0..4)
        .prop_map(|m| serde_json::Value::Object(m.into_iter().collect()))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    /// Issue 14: whatever a producer writes, the row trigger's checks never panic, and an
    /// event they accept encodes in both message modes, within `max_event_size`.
    #[test]
    fn accepted_events_encode(
        ty in hostile_text(),
        source in prop_oneof!["/[a-z]{1,8}".prop_map(String::from), hostile_text()],
        subject in proptest::option::of(hostile_text()),
        datacontenttype in prop_oneof![
            Just("application/json".to_string()),
            Just("text/plain".to_string()),
            hostile_text(),
        ],
        dataschema in proptest::option::of(prop_oneof![
            Just("https://example.com/s.json".to_string()),
            hostile_text(),
        ]),
        data in proptest::option::of(hostile_data()),
        extensions in hostile_extensions(),
        partition_key in proptest::option::of(hostile_text()),
        max in prop_oneof![Just(0usize), 64usize..300_000],
    ) {
        let row = crate::event::EventRow {
            ty: Some(&ty),
            source: Some(&source),
            subject: subject.as_deref(),
            datacontenttype: Some(&datacontenttype),
            dataschema: dataschema.as_deref(),
            data: data.as_deref(),
            extensions: Some(&extensions),
            stream: None,
            partition_key: partition_key.as_deref(),
        };
        if row.validate(max, "").is_ok() {
            let event = OutboxEvent {
                id: "7d2c5bd4-4f7e-4a53-8d4c-5d1d7a1c0e11".into(),
                ty: ty.clone(),
                source: source.clone(),
                subject: subject.clone(),
                time: "2026-11-27T07:00:00.000000Z".into(),
                datacontenttype: datacontenttype.clone(),
                dataschema: dataschema.clone(),
                data: data.clone(),
                partition_key: partition_key.clone(),
                extensions: extensions.as_object().cloned().unwrap_or_default(),
                stream: None,
            };
            for mode in [Mode::Binary, Mode::Structured] {
                let mut b = backend(RedisConfig {
                    stream: "events".into(),
                    max_event_size: max,
                    mode,
                    ..Default::default()
                });
                let encoded = b.encoder.encode(std::slice::from_ref(&event));
                prop_assert!(
                    encoded.outcome.iter().all(|o| *o == Outcome::Delivered),
                    "accepted, then refused in {mode:?}: {:?}",
                    encoded.outcome
                );
            }
        }
    }
}

/// The entry's fields as name, value pairs.
fn encode(event: &OutboxEvent, mode: Mode) -> Result<Fields, String> {
    let mut cmd = Cmd::new();
    write_entry(event, mode, &mut cmd)?;
    let args: Vec<Vec<u8>> = cmd.args_iter().map(|a| arg_bytes(&a).to_vec()).collect();
    Ok(args
        .chunks(2)
        .map(|p| (String::from_utf8_lossy(&p[0]).into_owned(), p[1].clone()))
        .collect())
}

fn field<'a>(fields: &'a Fields, name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(n, _)| n == name)
        .and_then(|(_, v)| std::str::from_utf8(v).ok())
}

#[test]
fn binary_mode_has_one_field_per_attribute() {
    let fields = encode(&event(), Mode::Binary).expect("encodes");
    assert_eq!(field(&fields, "ce_specversion"), Some("1.0"));
    assert_eq!(
        field(&fields, "ce_id"),
        Some("7d2c5bd4-4f7e-4a53-8d4c-5d1d7a1c0e11")
    );
    assert_eq!(field(&fields, "ce_source"), Some("/shop"));
    assert_eq!(field(&fields, "ce_type"), Some("order.created"));
    assert_eq!(field(&fields, "ce_time"), Some("2026-11-27T07:00:00+00:00"));
    assert_eq!(field(&fields, "ce_subject"), Some("order-1"));
    assert_eq!(field(&fields, "ce_partitionkey"), Some("c-1"));
    assert_eq!(field(&fields, "ce_tenant"), Some("acme"));
    assert_eq!(field(&fields, "content-type"), Some("application/json"));
    assert_eq!(field(&fields, "data"), Some(r#"{"n": 1}"#));
    assert_eq!(field(&fields, "ce_dataschema"), None);
    assert_eq!(field(&fields, "ce_datacontenttype"), None);
}

#[test]
fn structured_mode_is_one_cloudevents_json_field() {
    let fields = encode(&event(), Mode::Structured).expect("encodes");
    assert_eq!(fields.len(), 2);
    assert_eq!(
        field(&fields, "content-type"),
        Some(STRUCTURED_CONTENT_TYPE)
    );
    let body = field(&fields, "cloudevent").expect("cloudevent field");
    let parsed: cloudevents::Event = serde_json::from_str(body).expect("SDK parses it");
    assert_eq!(parsed, event().to_cloud_event().expect("valid"));
}

fn backend(config: RedisConfig) -> RedisStreamBackend {
    RedisStreamBackend::with_seeds(
        vec![Client::open("redis://127.0.0.1:1")
            .expect("valid url")
            .get_connection_info()
            .clone()],
        &config,
    )
}

/// The arguments of the command `b` sends for `events`, read back from its RESP bytes.
/// The commands `b` would send for `events`, each as its arguments.
fn sent_commands(b: &mut RedisStreamBackend, events: &[OutboxEvent]) -> Vec<Vec<String>> {
    let encoded = b.encoder.encode(events);
    // RESP: `*n` starts a command, then each argument is a `$len` line and its value.
    let text = String::from_utf8_lossy(&encoded.packed);
    let mut lines = text.split("\r\n");
    let mut commands: Vec<Vec<String>> = Vec::new();
    while let Some(line) = lines.next() {
        if line.starts_with('*') {
            commands.push(Vec::new());
        } else if line.starts_with('$') {
            let arg = lines.next().unwrap_or_default().to_string();
            commands.last_mut().expect("a command").push(arg);
        }
    }
    commands
}

#[test]
fn batch_is_one_transaction_naming_streams_trimming_and_using_idmp_when_available() {
    let mut b = backend(RedisConfig {
        stream: "events".into(),
        maxlen: 1000,
        producer_id: "broadcaster:shop".into(),
        ..Default::default()
    });
    let mut routed = event();
    routed.stream = Some("audit".into());
    routed.partition_key = Some("c-2".into());
    let events = [event(), routed];
    let fields = encode(&event(), Mode::Binary).expect("encodes");
    let plain = sent_commands(&mut b, &events);
    assert_eq!(plain.len(), 4, "MULTI, two XADDs, EXEC");
    assert_eq!(plain[0], ["MULTI"]);
    assert_eq!(
        plain[1][..6],
        ["XADD", "events", "MAXLEN", "~", "1000", "*"]
    );
    assert_eq!(plain[1][6], "ce_specversion");
    assert_eq!(plain[1].len(), 6 + 2 * fields.len());
    assert_eq!(plain[2][..2], ["XADD", "audit"]);
    assert_eq!(plain[3], ["EXEC"]);

    b.encoder.dialect.idempotent_xadd = true;
    b.encoder.config.maxlen = 0;
    let idmp = sent_commands(&mut b, &events);
    let id = format!("{} {}", event().source, event().id);
    assert_eq!(
        idmp[1][..6],
        [
            "XADD",
            "events",
            "IDMP",
            "broadcaster:shop",
            id.as_str(),
            "*"
        ]
    );
    assert_eq!(idmp[1].len(), 6 + 2 * fields.len());
}

#[test]
fn a_key_going_to_two_streams_goes_through_the_script() {
    let mut b = backend(RedisConfig {
        stream: "events".into(),
        ..Default::default()
    });
    let mut routed = event();
    routed.stream = Some("audit".into());
    let events = [event(), routed];
    let commands = sent_commands(&mut b, &events);
    assert_eq!(commands.len(), 1);
    let script = &commands[0];
    // EVALSHA sha numkeys keys... maxlen producer, then the first entry: key, IDMP id, the
    // number of fields, the fields.
    assert_eq!(script[0], "EVALSHA");
    assert_eq!(script[1], BATCH_SCRIPT.get_hash());
    assert_eq!(script[2..9], ["2", "events", "audit", "0", "", "c-1", ""]);
    let fields = encode(&event(), Mode::Binary).expect("encodes");
    assert_eq!(script[9], fields.len().to_string());
    assert_eq!(script[10], "ce_specversion");
    assert_eq!(script.len(), 7 + 2 * (3 + 2 * fields.len()));
}

#[test]
fn oversized_events_are_rejected_before_sending() {
    let mut b = backend(RedisConfig {
        stream: "events".into(),
        max_event_size: 64,
        ..Default::default()
    });
    let mut big = event();
    big.data = Some(format!(r#"{{"blob": "{}"}}"#, "x".repeat(100)));
    let mut other = event();
    other.partition_key = Some("c-2".into());
    let encoded = b.encoder.encode(&[big.clone(), event(), other.clone()]);
    let Outcome::Rejected(why) = &encoded.outcome[0] else {
        panic!("too big: {:?}", encoded.outcome[0]);
    };
    assert!(why.contains("max_event_size"), "{why}");
    assert_eq!(
        encoded.outcome[1],
        Outcome::NotSent,
        "its key's next event waits"
    );
    assert!(
        matches!(encoded.outcome[2], Outcome::Rejected(_)),
        "the small one is 64+ bytes too"
    );
    b.encoder.config.max_event_size = 0;
    let encoded = b.encoder.encode(&[big, other]);
    assert!(
        encoded.outcome.iter().all(|o| *o == Outcome::Delivered),
        "0: no limit"
    );
    assert_eq!(encoded.sent, [0, 1]);
    // The script path checks the same.
    b.encoder.config.max_event_size = 64;
    assert!(b.encoder.encode_entry(&event()).is_err());
}

#[test]
fn only_an_entry_id_counts_as_delivered() {
    use redis::Value;
    let s = |t: &str| Value::BulkString(t.as_bytes().to_vec());
    let error = |line: &str| match redis::parse_redis_value(format!("-{line}\r\n").as_bytes()) {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(entry_outcome(s("1700000000000-0")), Outcome::Delivered);
    assert!(matches!(
        entry_outcome(error("WRONGTYPE Operation against a key")),
        Outcome::Rejected(m) if m.starts_with("WRONGTYPE Operation")
    ));
    assert!(matches!(
        entry_outcome(error("OOM command not allowed")),
        Outcome::Deferred(_)
    ));
    assert!(matches!(entry_outcome(Value::Nil), Outcome::Deferred(_)));

    assert_eq!(
        script_entry_outcome(s("1700000000000-0")),
        Outcome::Delivered
    );
    assert_eq!(
        script_entry_outcome(Value::Array(vec![s("HELD")])),
        Outcome::NotSent
    );
    assert!(matches!(
        script_entry_outcome(Value::Array(vec![
            s("ERR"),
            s("WRONGTYPE Operation against a key")
        ])),
        Outcome::Rejected(_)
    ));
    assert!(matches!(
        script_entry_outcome(Value::Array(vec![s("ERR"), s("OOM command not allowed")])),
        Outcome::Deferred(_)
    ));
    // RESP3 turns a Lua false into a boolean: never mistaken for a delivery.
    assert_ne!(
        script_entry_outcome(Value::Boolean(false)),
        Outcome::Delivered
    );
    assert_ne!(script_entry_outcome(Value::Nil), Outcome::Delivered);
}

#[test]
fn server_versions() {
    assert_eq!(
        server_version("# Server\r\nredis_version:7.0.15\r\n"),
        Some((7, 0))
    );
    assert_eq!(server_version("redis_version:8.6.1\n"), Some((8, 6)));
    assert_eq!(server_version("nothing"), None);
}

#[test]
fn bad_options_are_refused_without_the_secret() {
    let kind = Kind::find("redis").expect("known");
    let err = kind
        .validate(&Options::new([("url", "http://user:s3cret@host")]))
        .expect_err("refused");
    assert!(err.to_string().contains("\"url\""), "{err}");
    assert!(!err.to_string().contains("s3cret"), "{err}");
    for (name, value) in [
        ("maxlen", "-1"),
        ("message_mode", "binaryish"),
        ("network_timeout", "0"),
        ("stream", ""),
        ("tls_cert_file", "/c.pem"),
    ] {
        let err = kind
            .validate(&Options::new([(name, value)]))
            .expect_err(name);
        assert!(err.to_string().contains(&format!("\"{name}\"")), "{err}");
    }
    // TLS files with a sentinel URL that is not TLS: said, not ignored; with rediss+sentinel://
    // they are for the sentinels and the primary, and a file that can't be read is said when
    // the backend is built, before any connect.
    let err = kind
        .validate(&Options::new([
            ("url", "redis+sentinel://u:s3cret@h:1/m"),
            ("tls_ca_file", "/ca.pem"),
        ]))
        .expect_err("plain sentinel URL with a CA");
    assert!(err.to_string().contains("rediss+sentinel://"), "{err}");
    assert!(!err.to_string().contains("s3cret"), "{err}");
    let tls = Options::new([
        ("url", "rediss+sentinel://h:1/m"),
        ("tls_ca_file", "/nonexistent/ca.pem"),
    ]);
    kind.validate(&tls).expect("TLS sentinel URL with a CA");
    match kind.build(&tls) {
        Err(BatchError::Misconfigured(why)) => assert!(why.contains("tls_ca_file"), "{why}"),
        Err(e) => panic!("not a configuration error: {e}"),
        Ok(_) => panic!("built with a CA file that does not exist"),
    }
    assert!(RedisConfig::SECRETS.contains(&"url"));
    let config = RedisConfig::from_options(&Options::new([
        ("url", "redis://h:1/2"),
        ("stream", "audit"),
        ("maxlen", "100"),
        ("message_mode", "structured"),
        ("network_timeout", "250"),
    ]))
    .expect("valid");
    assert_eq!(
        (config.stream.as_str(), config.maxlen, config.mode),
        ("audit", 100, Mode::Structured)
    );
    assert_eq!(config.timeout, std::time::Duration::from_millis(250));
}

#[test]
fn unreachable_broker_is_unavailable_not_rejected() {
    // Port 1 on loopback: nothing listens there, the connect is refused at once.
    let kind = Kind::find("redis").expect("known");
    let options = Options::new([
        ("url", "redis://127.0.0.1:1"),
        ("stream", "s"),
        ("network_timeout", "500"),
    ]);
    let mut backend = kind.build(&options).expect("valid config");
    assert!(matches!(
        backend.health_check(),
        Err(BatchError::Unavailable(_))
    ));
    assert!(matches!(
        backend.publish(&[event()]),
        Err(BatchError::Unavailable(_))
    ));
}

#[test]
fn a_field_longer_than_the_server_reads_is_the_events_fault() {
    let mut b = backend(RedisConfig::default());
    b.encoder.dialect.max_bulk_len = 1024;
    b.encoder.dialect.max_bulk_len_told = true;
    let mut big = event();
    big.data = Some(format!("\"{}\"", "x".repeat(2000)));
    let mut other = event();
    other.partition_key = Some("c-2".into());
    let encoded = b.encoder.encode(&[big.clone(), other.clone()]);
    match &encoded.outcome[0] {
        Outcome::Rejected(why) => assert!(
            why.contains("2002 bytes") && why.contains("proto-max-bulk-len of 1024"),
            "{why}"
        ),
        other => panic!("not rejected: {other:?}"),
    }
    // Another key's event still goes.
    assert_eq!(encoded.sent, vec![1]);

    // Where CONFIG is refused, the limit is learnt from an argument the server dropped: it
    // applies, and the error says how it was learnt.
    let unknown = Dialect::default();
    assert_eq!(unknown.with_learnt_max_bulk_len(None), unknown);
    b.encoder.dialect = unknown.with_learnt_max_bulk_len(Some(2001));
    assert_eq!(b.encoder.dialect.max_bulk_len, 2001);
    let encoded = b.encoder.encode(&[big.clone(), other.clone()]);
    match &encoded.outcome[0] {
        Outcome::Rejected(why) => assert!(
            why.contains("2002 bytes") && why.contains("refused an argument of 2002 bytes"),
            "{why}"
        ),
        other => panic!("not rejected: {other:?}"),
    }
    // What CONFIG told wins over anything learnt.
    let told = Dialect::of("", Some(4096));
    assert_eq!(told.with_learnt_max_bulk_len(Some(2001)).max_bulk_len, 4096);
    // The batch knows its longest argument, to ask the server about it.
    b.encoder.dialect = told;
    let encoded = b.encoder.encode(&[big, other]);
    assert!(encoded.longest_arg >= 2002, "{}", encoded.longest_arg);
}

#[test]
fn info_fields_and_evicting_policies() {
    let info = "# Server\r\nredis_version:7.0.15\r\n# Memory\r\nmaxmemory_policy:allkeys-lru\r\n# Cluster\r\ncluster_enabled:1\r\n";
    assert_eq!(reply::info_field(info, "cluster_enabled"), Some("1"));
    assert_eq!(
        reply::info_field(info, "maxmemory_policy"),
        Some("allkeys-lru")
    );
    assert_eq!(reply::info_field(info, "maxmemory"), None);
    assert!(reply::evicts_streams("allkeys-lfu"));
    assert!(!reply::evicts_streams("volatile-lru"));
    assert!(!reply::evicts_streams("noeviction"));
}
