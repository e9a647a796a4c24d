//! The fault suite: each scenario produces events from concurrent producers while something
//! breaks (Redis, the worker, Postgres itself), then reads the whole stream and compares ids.
//! Every scenario prints `produced / delivered / duplicates / lost` and asserts that nothing
//! committed is lost and nothing delivered was never committed.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{Cluster, Entry, PgClient, Redis, Setup, DEFAULT_STREAM};

/// What producers did, by event id.
#[derive(Default)]
struct Produced {
    /// COMMIT returned success.
    committed: Vec<String>,
    /// The connection died during COMMIT: the transaction may or may not have committed.
    ambiguous: Vec<String>,
    /// Rolled back, or failed before COMMIT: must never arrive.
    rolled_back: Vec<String>,
}

impl Produced {
    fn merge(mut self, other: Produced) -> Produced {
        self.committed.extend(other.committed);
        self.ambiguous.extend(other.ambiguous);
        self.rolled_back.extend(other.rolled_back);
        self
    }
}

struct Producers {
    stop: Arc<AtomicBool>,
    bounded: bool,
    handles: Vec<JoinHandle<Produced>>,
}

#[derive(Clone, Copy)]
struct Load {
    producers: usize,
    per_tx: usize,
    /// Stop after this many transactions per producer (None: until stopped).
    transactions: Option<usize>,
    /// Roll back every other transaction.
    roll_back_half: bool,
    pause: Duration,
}

impl Load {
    /// `producers` connections committing `per_tx` events per transaction until stopped.
    fn unbounded(producers: usize, per_tx: usize, pause: Duration) -> Load {
        Load {
            producers,
            per_tx,
            transactions: None,
            roll_back_half: false,
            pause,
        }
    }

    /// The same, `transactions` times each.
    fn bounded(producers: usize, per_tx: usize, transactions: usize) -> Load {
        Load {
            transactions: Some(transactions),
            ..Load::unbounded(producers, per_tx, Duration::ZERO)
        }
    }
}

impl Producers {
    /// Producer `p` writes partition key `p-<p>` with a counter in `data.n`, reconnecting
    /// through restarts.
    fn start(port: u16, load: Load) -> Producers {
        let stop = Arc::new(AtomicBool::new(false));
        let handles = (0..load.producers)
            .map(|p| {
                let stop = stop.clone();
                std::thread::spawn(move || produce(port, p, load, &stop))
            })
            .collect();
        Producers {
            stop,
            bounded: load.transactions.is_some(),
            handles,
        }
    }

    /// Stops unbounded producers (bounded ones run to their count) and collects their work.
    fn finish(self) -> Produced {
        if !self.bounded {
            self.stop.store(true, Ordering::Relaxed);
        }
        self.handles
            .into_iter()
            .map(|h| h.join().expect("producer thread"))
            .fold(Produced::default(), Produced::merge)
    }
}

fn connect(port: u16) -> Option<PgClient> {
    let params =
        format!("host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=2");
    PgClient::connect(&params, postgres::NoTls).ok()
}

fn produce(port: u16, p: usize, load: Load, stop: &AtomicBool) -> Produced {
    let mut out = Produced::default();
    let mut client: Option<PgClient> = None;
    let key = format!("p-{p}");
    let mut n: i64 = 0;
    let mut tx_count = 0;
    while !stop.load(Ordering::Relaxed) && load.transactions.is_none_or(|t| tx_count < t) {
        let Some(c) = client.as_mut() else {
            client = connect(port);
            if client.is_none() {
                std::thread::sleep(Duration::from_millis(100));
            }
            continue;
        };
        let roll_back = load.roll_back_half && tx_count % 2 == 1;
        let mut ids = Vec::with_capacity(load.per_tx);
        let mut result = c.batch_execute("BEGIN");
        for _ in 0..load.per_tx {
            if result.is_err() {
                break;
            }
            match c.query_one(
                "SELECT broadcaster_publish('fault.test', json_build_object('n', $1::bigint), \
                 partition_key => $2)::text",
                &[&n, &key],
            ) {
                Ok(row) => {
                    ids.push(row.get::<_, String>(0));
                    n += 1;
                }
                Err(e) => result = Err(e),
            }
        }
        if result.is_err() {
            // Nothing was committed.
            out.rolled_back.extend(ids);
            client = None;
            continue;
        }
        if roll_back {
            if c.batch_execute("ROLLBACK").is_err() {
                client = None;
            }
            out.rolled_back.extend(ids);
        } else {
            match c.batch_execute("COMMIT") {
                Ok(()) => out.committed.extend(ids),
                Err(_) => {
                    out.ambiguous.extend(ids);
                    client = None;
                }
            }
        }
        tx_count += 1;
        if !load.pause.is_zero() {
            std::thread::sleep(load.pause);
        }
    }
    out
}

/// Waits until every committed event is in the stream and the outbox is empty, then checks
/// and prints the tally.
fn settle_and_check(
    name: &str,
    cluster: &Cluster,
    redis: &Redis,
    produced: &Produced,
) -> Vec<Entry> {
    let committed: HashSet<&String> = produced.committed.iter().collect();
    let mut c = cluster.connect();
    let entries = common::wait_for(
        &format!("{name}: every committed event delivered"),
        Duration::from_secs(180),
        || {
            let entries = redis.entries(DEFAULT_STREAM);
            let delivered: HashSet<String> = entries.iter().map(Entry::event_id).collect();
            let all_in = committed.iter().all(|id| delivered.contains(*id));
            let outbox_empty = c
                .query_one("SELECT count(*) = 0 FROM broadcaster_outbox", &[])
                .ok()
                .is_some_and(|r| r.get::<_, bool>(0));
            (all_in && outbox_empty).then_some(entries)
        },
    );
    let delivered: Vec<String> = entries.iter().map(Entry::event_id).collect();
    let unique: HashSet<&String> = delivered.iter().collect();
    let duplicates = delivered.len() - unique.len();
    let lost = committed.iter().filter(|id| !unique.contains(*id)).count();
    let may_arrive: HashSet<&String> = produced
        .committed
        .iter()
        .chain(&produced.ambiguous)
        .collect();
    let never_committed: Vec<&&String> = unique
        .iter()
        .filter(|id| !may_arrive.contains(**id))
        .collect();
    let rolled_back: HashSet<&String> = produced.rolled_back.iter().collect();
    println!(
        "| {name} | {} | {} | {} | {duplicates} | {lost} |",
        produced.committed.len() + produced.ambiguous.len() + produced.rolled_back.len(),
        produced.committed.len(),
        delivered.len(),
    );
    assert_eq!(lost, 0, "{name}: committed events lost");
    assert!(
        never_committed.is_empty(),
        "{name}: {} delivered events were never committed",
        never_committed.len()
    );
    assert!(
        unique.iter().all(|id| !rolled_back.contains(*id)),
        "{name}: a rolled-back event arrived"
    );
    check_key_order(name, &entries);
    entries
}

/// Within each partition key, first deliveries arrive in the order the key's transactions
/// committed (a crash may replay a batch later, with the same ids).
fn check_key_order(name: &str, entries: &[Entry]) {
    let mut seen = HashSet::new();
    let mut last: HashMap<String, i64> = HashMap::new();
    for e in entries {
        if !seen.insert(e.event_id()) {
            continue;
        }
        let (Some(key), Some(data)) = (e.get("ce_partitionkey"), e.get("data")) else {
            continue;
        };
        let n = serde_json::from_str::<serde_json::Value>(data).expect("json")["n"]
            .as_i64()
            .expect("n");
        if let Some(prev) = last.insert(key.to_string(), n) {
            assert!(
                n > prev,
                "{name}: key {key}: event {n} arrived after {prev}"
            );
        }
    }
}

fn redis_dir(tag: &str) -> PathBuf {
    let dir = PathBuf::from(format!("/tmp/bc-redis-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

const FAST_RETRY: &[(&str, &str)] = &[
    ("broadcaster.poll_interval", "200ms"),
    ("broadcaster.retry_max_delay", "1s"),
    ("broadcaster.network_timeout", "1s"),
];

#[test]
fn redis_down_for_30_seconds_while_producers_commit() {
    let dir = redis_dir("outage");
    let Setup { mut redis, cluster } = Setup::persistent(&dir, FAST_RETRY);
    let load = Load::unbounded(4, 10, Duration::from_millis(20));
    let producers = Producers::start(cluster.port, load);
    std::thread::sleep(Duration::from_secs(3));
    redis.kill();
    let down_at = Instant::now();
    cluster.wait_healthy(false, Duration::from_secs(10));
    let mut c = cluster.connect();
    while down_at.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_secs(1));
        let burnt: i64 = c
            .query_one("SELECT count(*) FROM broadcaster_failures", &[])
            .expect("count")
            .get(0);
        assert_eq!(burnt, 0, "an outage must not count attempts against events");
    }
    let backlog: i64 = c
        .query_one("SELECT count(*) FROM broadcaster_outbox", &[])
        .expect("count")
        .get(0);
    assert!(backlog > 0, "producers kept committing during the outage");
    redis.restart();
    std::thread::sleep(Duration::from_secs(2));
    let produced = producers.finish();
    settle_and_check("Redis killed for 30 s", &cluster, &redis, &produced);
    cluster.wait_healthy(true, Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn redis_restarted_mid_batch() {
    let dir = redis_dir("restart");
    let Setup { mut redis, cluster } = Setup::persistent(&dir, FAST_RETRY);
    let load = Load::unbounded(4, 50, Duration::ZERO);
    let producers = Producers::start(cluster.port, load);
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(1500));
        redis.restart();
    }
    std::thread::sleep(Duration::from_secs(1));
    let produced = producers.finish();
    settle_and_check(
        "Redis restarted mid-batch (3x)",
        &cluster,
        &redis,
        &produced,
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn worker_sigkilled_mid_batch() {
    let s = Setup::new(FAST_RETRY);
    let load = Load::unbounded(4, 50, Duration::ZERO);
    let producers = Producers::start(s.cluster.port, load);
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(1500));
        let pid = s.cluster.worker_pid();
        let status = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        // The postmaster treats it as a crash: every backend restarts, producers reconnect.
        common::wait_for("a new relay worker", common::DEADLINE, || {
            let new = s.cluster.worker_pid();
            (new != pid).then_some(())
        });
    }
    std::thread::sleep(Duration::from_secs(1));
    let produced = producers.finish();
    settle_and_check(
        "worker SIGKILLed mid-batch (3x)",
        &s.cluster,
        &s.redis,
        &produced,
    );
    assert!(!s.cluster.log().contains("PANIC"));
}

#[test]
fn postgres_stopped_immediately_mid_traffic() {
    let s = Setup::new(FAST_RETRY);
    let load = Load::unbounded(4, 50, Duration::ZERO);
    let producers = Producers::start(s.cluster.port, load);
    for mode in ["immediate", "fast", "immediate"] {
        std::thread::sleep(Duration::from_millis(1500));
        s.cluster.stop_server(mode);
        s.cluster.start_server();
    }
    std::thread::sleep(Duration::from_secs(1));
    let produced = producers.finish();
    settle_and_check(
        "Postgres stopped (immediate, fast, immediate)",
        &s.cluster,
        &s.redis,
        &produced,
    );
}

#[test]
fn half_the_transactions_roll_back() {
    let s = Setup::new(FAST_RETRY);
    let load = Load {
        roll_back_half: true,
        ..Load::bounded(4, 20, 50)
    };
    let produced = Producers::start(s.cluster.port, load).finish();
    assert_eq!(produced.rolled_back.len(), produced.committed.len());
    let entries = settle_and_check(
        "half the transactions roll back",
        &s.cluster,
        &s.redis,
        &produced,
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        s.redis.len(DEFAULT_STREAM),
        entries.len(),
        "nothing else arrives later"
    );
    assert_eq!(entries.len(), produced.committed.len());
}

#[test]
fn eight_producers_five_thousand_events_each() {
    // One relay worker per database: a second one could reorder a partition key, so the design
    // does not run one. SKIP LOCKED still guarantees no row is claimed twice.
    let s = Setup::new(&[]);
    let load = Load::bounded(8, 50, 100);
    let produced = Producers::start(s.cluster.port, load).finish();
    assert_eq!(produced.committed.len(), 40_000);
    let entries = settle_and_check(
        "8 producers x 5,000 events",
        &s.cluster,
        &s.redis,
        &produced,
    );
    assert_eq!(entries.len(), 40_000, "no duplicates without a fault");
}

fn publish(c: &mut PgClient, key: &str, n: i64, stream: Option<&str>) -> String {
    c.query_one(
        "SELECT broadcaster_publish('step', json_build_object('n', $1::bigint), partition_key => $2, stream => $3)::text",
        &[&n, &key, &stream],
    )
    .expect("publish")
    .get(0)
}

/// Makes `key` a string: Redis answers WRONGTYPE to every XADD to it.
fn poison(r: &mut redis::Connection, key: &str) {
    redis::cmd("SET")
        .arg(key)
        .arg("not a stream")
        .query::<()>(r)
        .expect("SET");
}

/// Removes what [`poison`] did.
fn cure(r: &mut redis::Connection, key: &str) {
    redis::cmd("DEL").arg(key).query::<()>(r).expect("DEL");
}

/// A role `ops` granted what the README grants operators, connected.
fn operator(c: &mut PgClient, port: u16) -> PgClient {
    c.batch_execute(
        "CREATE ROLE ops LOGIN; \
         GRANT SELECT ON broadcaster_outbox, broadcaster_failures, broadcaster_dead_events, \
                         broadcaster_status, broadcaster_published TO ops; \
         GRANT EXECUTE ON FUNCTION broadcaster_health(), broadcaster_status(), broadcaster_relays(), \
                                   broadcaster_requeue(uuid[]), broadcaster_requeue_all(), \
                                   broadcaster_discard(uuid[]), broadcaster_discard_all(), \
                                   broadcaster_replay(uuid[]), \
                                   broadcaster_replay(timestamptz, timestamptz, text) TO ops; \
         GRANT INSERT, DELETE ON broadcaster_outbox TO ops; \
         GRANT DELETE ON broadcaster_failures TO ops;",
    )
    .expect("ops role");
    PgClient::connect(
        &format!("host=127.0.0.1 port={port} user=ops dbname=postgres"),
        postgres::NoTls,
    )
    .expect("ops connects")
}

fn ids_in(redis: &Redis, stream: &str) -> Vec<String> {
    redis.entries(stream).iter().map(Entry::event_id).collect()
}

#[test]
fn poison_event_is_dead_lettered_and_holds_only_its_key() {
    let s = Setup::new(&[
        ("broadcaster.max_attempts", "2"),
        ("broadcaster.poll_interval", "200ms"),
    ]);
    // A stream key that holds a string: Redis answers WRONGTYPE for this event alone.
    let mut r = s.redis.connection();
    poison(&mut r, "poisoned");
    let mut c = s.cluster.connect();
    let k1 = publish(&mut c, "k", 1, None);
    let poison = publish(&mut c, "k", 2, Some("poisoned"));
    let k3 = publish(&mut c, "k", 3, None);
    let others: Vec<String> = (0..20).map(|n| publish(&mut c, "other", n, None)).collect();

    let dead = common::wait_for("the poison event to be dead", common::DEADLINE, || {
        c.query_opt(
            "SELECT attempts, last_error FROM broadcaster_dead_events WHERE id::text = $1",
            &[&poison],
        )
        .ok()
        .flatten()
        .map(|row| (row.get::<_, i32>(0), row.get::<_, String>(1)))
    });
    assert_eq!(dead.0, 2);
    assert!(dead.1.contains("WRONGTYPE"), "last_error: {}", dead.1);
    // Other keys flowed; the poison's key is held behind it.
    let delivered = s.redis.wait_entries(DEFAULT_STREAM, 21);
    let ids: Vec<String> = delivered.iter().map(Entry::event_id).collect();
    assert!(ids.contains(&k1));
    assert!(others.iter().all(|id| ids.contains(id)));
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !ids_in(&s.redis, DEFAULT_STREAM).contains(&k3),
        "k3 waits behind the dead event"
    );

    // Remove the cause, requeue as an operator granted what the README says: the poison event
    // goes out, then the key moves on.
    cure(&mut r, "poisoned");
    let mut ops = operator(&mut c, s.cluster.port);
    let dead_seen: i64 = ops
        .query_one(
            "SELECT dead FROM broadcaster_status WHERE dead IS NOT NULL",
            &[],
        )
        .expect("status as ops")
        .get(0);
    assert_eq!(dead_seen, 1);
    let requeued: i64 = ops
        .query_one(
            "SELECT broadcaster_requeue(ARRAY[$1::text::uuid])",
            &[&poison],
        )
        .expect("requeue")
        .get(0);
    assert_eq!(requeued, 1);
    assert_eq!(s.redis.wait_entries("poisoned", 1)[0].event_id(), poison);
    common::wait_for("k3 after the requeued event", common::DEADLINE, || {
        ids_in(&s.redis, DEFAULT_STREAM).contains(&k3).then_some(())
    });
    println!(
        "| poison event mid-key | {} | {} | {} | 0 | 0 |",
        23,
        23,
        s.redis.len(DEFAULT_STREAM) + s.redis.len("poisoned")
    );
}

#[test]
fn poison_event_inside_a_backlog_of_full_batches() {
    // Batches of 50 from a 500-event backlog: while Redis takes a full batch, the relay already
    // deletes it and claims the next. The batch holding the poison event must undo that: its
    // key's later events wait, the next batch is claimed again, nothing goes out twice.
    let s = Setup::new(&[
        ("broadcaster.batch_size", "50"),
        ("broadcaster.max_attempts", "2"),
        ("broadcaster.poll_interval", "200ms"),
    ]);
    let mut r = s.redis.connection();
    poison(&mut r, "poisoned");
    let mut c = s.cluster.connect();
    // Event 120 (key k0, in the third batch) goes to the poisoned key.
    c.batch_execute(
        "INSERT INTO broadcaster_outbox (type, data, partition_key, stream) \
         SELECT 'bulk', json_build_object('n', g), 'k' || (g % 10), \
                CASE WHEN g = 120 THEN 'poisoned' END \
           FROM generate_series(1, 500) g",
    )
    .expect("insert");
    common::wait_for("the poison event to be dead", common::DEADLINE, || {
        c.query_opt("SELECT 1 FROM broadcaster_dead_events", &[])
            .ok()
            .flatten()
            .map(drop)
    });
    // Everything but k0's events from 120 on: 500 - 1 - 38.
    let delivered = s.redis.wait_entries(DEFAULT_STREAM, 461);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        s.redis.len(DEFAULT_STREAM),
        461,
        "k0 waits behind its dead event"
    );
    let ids: HashSet<String> = delivered.iter().map(Entry::event_id).collect();
    assert_eq!(ids.len(), 461, "no event delivered twice");
    check_key_order("backlog", &delivered);

    cure(&mut r, "poisoned");
    c.batch_execute("SELECT broadcaster_requeue_all()")
        .expect("requeue");
    let all = s.redis.wait_entries(DEFAULT_STREAM, 499);
    assert_eq!(s.redis.wait_entries("poisoned", 1).len(), 1);
    let ids: HashSet<String> = all.iter().map(Entry::event_id).collect();
    assert_eq!(ids.len(), 499, "no event delivered twice");
    check_key_order("backlog after requeue", &all);
    println!(
        "| poison event inside full batches | 500 | 500 | {} | 0 | 0 |",
        s.redis.len(DEFAULT_STREAM) + s.redis.len("poisoned")
    );
}

#[test]
fn skip_mode_lets_a_key_flow_past_its_dead_event_and_discard_drops_it() {
    let s = Setup::new(&[
        ("broadcaster.max_attempts", "1"),
        ("broadcaster.on_dead_event", "skip"),
        ("broadcaster.poll_interval", "200ms"),
    ]);
    let mut r = s.redis.connection();
    poison(&mut r, "poisoned");
    let mut c = s.cluster.connect();
    let poison = publish(&mut c, "k", 1, Some("poisoned"));
    let after = publish(&mut c, "k", 2, None);
    assert_eq!(s.redis.wait_entries(DEFAULT_STREAM, 1)[0].event_id(), after);
    let dead: i64 = c
        .query_one("SELECT count(*) FROM broadcaster_dead_events", &[])
        .expect("count")
        .get(0);
    assert_eq!(dead, 1);
    let mut ops = operator(&mut c, s.cluster.port);
    let discarded: i64 = ops
        .query_one(
            "SELECT broadcaster_discard(ARRAY[$1::text::uuid])",
            &[&poison],
        )
        .expect("discard")
        .get(0);
    assert_eq!(discarded, 1);
    let left: i64 = c
        .query_one("SELECT count(*) FROM broadcaster_outbox", &[])
        .expect("count")
        .get(0);
    assert_eq!(left, 0);
}

#[test]
fn a_failing_event_deleted_by_hand_stops_holding_its_key() {
    // Failures are kept beside the outbox: one whose event a user deletes must not hold the
    // event's key, and is forgotten.
    let s = Setup::new(&[
        ("broadcaster.max_attempts", "1000"),
        ("broadcaster.poll_interval", "200ms"),
    ]);
    let mut r = s.redis.connection();
    poison(&mut r, "poisoned");
    let mut c = s.cluster.connect();
    let failing = publish(&mut c, "k", 1, Some("poisoned"));
    let failures = |c: &mut PgClient| -> i64 {
        c.query_one("SELECT count(*) FROM broadcaster_failures", &[])
            .expect("count")
            .get(0)
    };
    common::wait_for("a failed attempt", common::DEADLINE, || {
        (failures(&mut c) == 1).then_some(())
    });
    let after = publish(&mut c, "k", 2, None);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(s.redis.len(DEFAULT_STREAM), 0, "k's next event waits");
    c.execute(
        "DELETE FROM broadcaster_outbox WHERE id::text = $1",
        &[&failing],
    )
    .expect("delete");
    assert_eq!(s.redis.wait_entries(DEFAULT_STREAM, 1)[0].event_id(), after);
    common::wait_for("the failure forgotten", common::DEADLINE, || {
        (failures(&mut c) == 0).then_some(())
    });
}

#[test]
fn oversized_event_goes_dead_without_reaching_redis() {
    let s = Setup::new(&[
        ("broadcaster.max_attempts", "1"),
        ("broadcaster.max_event_size", "2kB"),
    ]);
    let mut c = s.cluster.connect();
    // Refused when written, counted as the relay counts it.
    let refused = c
        .query_one(
            "SELECT broadcaster_publish('big', json_build_object('blob', repeat('x', 5000)))::text",
            &[],
        )
        .expect_err("too large");
    assert_eq!(
        refused.code(),
        Some(&postgres::error::SqlState::PROGRAM_LIMIT_EXCEEDED)
    );
    // A row written past the trigger is refused by the relay, before it reaches Redis.
    c.batch_execute("ALTER TABLE broadcaster_outbox DISABLE TRIGGER broadcaster_outbox_accept")
        .expect("disable");
    let big: String = c
        .query_one(
            "SELECT broadcaster_publish('big', json_build_object('blob', repeat('x', 5000)))::text",
            &[],
        )
        .expect("publish")
        .get(0);
    c.batch_execute(
        "ALTER TABLE broadcaster_outbox ENABLE ALWAYS TRIGGER broadcaster_outbox_accept",
    )
    .expect("enable");
    let small = publish(&mut c, "other", 1, None);
    assert_eq!(s.redis.wait_entries(DEFAULT_STREAM, 1)[0].event_id(), small);
    let error: String = common::wait_for("the big event to be dead", common::DEADLINE, || {
        c.query_opt(
            "SELECT last_error FROM broadcaster_dead_events WHERE id::text = $1",
            &[&big],
        )
        .ok()
        .flatten()
        .map(|row| row.get(0))
    });
    assert!(error.contains("max_event_size"), "{error}");
    assert_eq!(
        s.redis.len(DEFAULT_STREAM),
        1,
        "the big one never reached Redis"
    );
}

#[test]
fn a_password_that_needs_escaping_stays_out_of_logs_status_and_settings() {
    // Characters a URL must escape; the relay decodes them, Redis requires the decoded form.
    const PASSWORD: &str = "p@ss:w/rd%?#x";
    const ENCODED: &str = "p%40ss%3Aw%2Frd%25%3F%23x";
    let mut redis = common::Redis::start();
    let mut admin = redis.connection();
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg(PASSWORD)
        .query::<()>(&mut admin)
        .expect("requirepass");
    let url = format!("redis://:{ENCODED}@127.0.0.1:{}", redis.port);
    let mut settings = FAST_RETRY.to_vec();
    settings.push(("log_min_messages", "debug5"));
    let cluster = Cluster::start(&url, &settings);
    let mut c = cluster.connect();
    c.batch_execute("CREATE EXTENSION broadcaster")
        .expect("extension");
    let id = publish(&mut c, "k", 1, None);
    // Redis answers only to the decoded password: it arrived, so the URL was read right.
    let mut authed = redis::Client::open(format!("redis://:{ENCODED}@127.0.0.1:{}", redis.port))
        .expect("url")
        .get_connection()
        .expect("connect");
    common::wait_for(&format!("{id} in Redis"), common::DEADLINE, || {
        let n: usize = redis::cmd("XLEN")
            .arg(DEFAULT_STREAM)
            .query(&mut authed)
            .ok()?;
        (n == 1).then_some(())
    });
    // A reload that changes the URL: PostgreSQL logs the new value of every changed setting,
    // under the name as postgresql.conf spells it. Each reload is waited for before the next:
    // two SIGHUPs the postmaster has not yet handled make one reload, and one line.
    let said = || cluster.log().matches("may hold a password changed").count();
    cluster.set_and_reload("broadcaster.redis_url", &format!("{url}/1"));
    common::wait_for("the first reload", common::DEADLINE, || {
        (said() >= 1).then_some(())
    });
    let before = said();
    c.batch_execute("ALTER SYSTEM RESET broadcaster.redis_url")
        .expect("reset");
    let conf = cluster.data().join("postgresql.conf");
    let mut text = std::fs::read_to_string(&conf).expect("postgresql.conf");
    text.push_str(&format!("Broadcaster.Redis_URL = '{url}/2'\n"));
    std::fs::write(&conf, &text).expect("postgresql.conf");
    c.batch_execute("SELECT pg_reload_conf()").expect("reload");
    common::wait_for("the capitalised reload", common::DEADLINE, || {
        (said() > before).then_some(())
    });
    cluster.set_and_reload("broadcaster.redis_url", &url);
    // Errors with the URL in play: Redis gone.
    redis.kill();
    common::wait_for("the outage in the log", common::DEADLINE, || {
        cluster.log().contains("broker unavailable").then_some(())
    });
    let status: Vec<String> = c
        .query("SELECT s::text FROM broadcaster_status s", &[])
        .expect("status")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let activity: Vec<String> = c
        .query("SELECT a::text FROM pg_stat_activity a", &[])
        .expect("activity")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut nosy = cluster.connect_as_new_role("nosy");
    let settings_seen: Vec<String> = nosy
        .query("SELECT s::text FROM pg_settings s", &[])
        .expect("pg_settings")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let log = cluster.log();
    assert!(
        log.contains("may hold a password changed (its value is not logged)"),
        "the reload is said, without the value"
    );
    assert!(
        log.contains("DEBUG"),
        "log_min_messages = debug5 took effect"
    );
    for (place, texts) in [
        ("the server log", vec![log]),
        ("broadcaster_status", status),
        ("pg_stat_activity", activity),
        ("pg_settings, as a non-superuser", settings_seen),
    ] {
        for text in texts {
            for secret in [PASSWORD, ENCODED, url.as_str()] {
                assert!(!text.contains(secret), "{secret:?} in {place}");
            }
        }
    }
}

#[test]
fn redis_password_stays_secret() {
    // Nothing listens on this port, so the worker logs connection failures for this URL.
    let port = common::free_port();
    let url = format!("redis://:hunter2-secret@127.0.0.1:{port}");
    let cluster = Cluster::start(&url, FAST_RETRY);
    let mut c = cluster.connect();
    c.batch_execute("CREATE EXTENSION broadcaster; CREATE ROLE app LOGIN; \
                     GRANT INSERT ON broadcaster_outbox TO app; \
                     GRANT EXECUTE ON FUNCTION broadcaster_publish(text, text, text, text, text, jsonb, text, text), \
                                               broadcaster_publish(text, json, text, text, text, jsonb, text, text), \
                                               broadcaster_publish(text, jsonb, text, text, text, jsonb, text, text) TO app")
        .expect("setup");
    let shown: String = c
        .query_one("SHOW broadcaster.redis_url", &[])
        .expect("superuser sees it")
        .get(0);
    assert_eq!(shown, url);

    let mut app = PgClient::connect(
        &format!(
            "host=127.0.0.1 port={} user=app dbname=postgres",
            cluster.port
        ),
        postgres::NoTls,
    )
    .expect("app connects");
    let err = app
        .query_one("SHOW broadcaster.redis_url", &[])
        .expect_err("hidden from non-superusers");
    assert_eq!(
        err.code(),
        Some(&postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
    );
    let via_settings: Option<String> = app
        .query_one("SELECT current_setting('broadcaster.redis_url', true)", &[])
        .map(|r| r.get(0))
        .unwrap_or(None);
    assert_ne!(via_settings.as_deref(), Some(url.as_str()));
    // The granted role can publish but not read or requeue.
    app.query_one("SELECT broadcaster_publish('from.app')", &[])
        .expect("app publishes");
    let denied = app
        .query_one("SELECT count(*) FROM broadcaster_outbox", &[])
        .expect_err("no SELECT");
    assert_eq!(
        denied.code(),
        Some(&postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
    );
    let denied = app
        .query_one("SELECT broadcaster_requeue_all()", &[])
        .expect_err("no requeue");
    assert_eq!(
        denied.code(),
        Some(&postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
    );

    common::wait_for("the worker to log the outage", common::DEADLINE, || {
        cluster.log().contains("broker unavailable").then_some(())
    });
    let log = cluster.log();
    assert!(
        !log.contains("hunter2"),
        "the password reached the server log"
    );
}

#[test]
fn a_lock_held_on_a_pending_row_makes_the_relay_wait_and_keeps_order() {
    // The claim deletes the rows it takes: a row another session holds locked (an operator's
    // open UPDATE) is waited for, not passed, so its key's later events can't overtake it.
    let s = Setup::new(&[]);
    let mut c = s.cluster.connect();
    // No backend: events stay pending while the lock is taken. The reload reaches the relay
    // when it next looks: until it says so, an event published now could still go out (and the
    // lock below would then hold nothing).
    s.cluster.set_and_reload("broadcaster.backend", "none");
    common::wait_for("the relay to take the reload", common::DEADLINE, || {
        c.query_opt(
            "SELECT 1 FROM broadcaster_status WHERE last_error LIKE '%unknown backend \"none\"%'",
            &[],
        )
        .expect("broadcaster_status")
    });
    let first = publish(&mut c, "k", 1, None);
    let second = publish(&mut c, "k", 2, None);
    let other = publish(&mut c, "other", 3, None);
    let mut operator = s.cluster.connect();
    let mut lock = operator.transaction().expect("begin");
    lock.execute(
        "SELECT 1 FROM broadcaster_outbox WHERE id = $1::text::uuid FOR UPDATE",
        &[&first],
    )
    .expect("lock the first event");

    s.cluster.set_and_reload("broadcaster.backend", "redis");
    common::wait_for("the relay to wait for the lock", common::DEADLINE, || {
        c.query_opt(
            "SELECT 1 FROM pg_stat_activity \
              WHERE backend_type = 'broadcaster relay' AND wait_event_type = 'Lock'",
            &[],
        )
        .expect("pg_stat_activity")
    });
    assert_eq!(
        s.redis.len(DEFAULT_STREAM),
        0,
        "nothing passes the locked row"
    );

    lock.commit().expect("release the lock");
    s.redis.wait_entries(DEFAULT_STREAM, 3);
    assert_eq!(ids_in(&s.redis, DEFAULT_STREAM), [first, second, other]);
}

#[test]
fn rows_written_past_the_disabled_trigger_fail_without_stopping_the_rest() {
    // A superuser can disable the outbox's trigger and write rows that are not events. The relay
    // must still count their failed attempts (beside the rows, which stay as they were written),
    // and go on with the rows behind them: here a full batch of them first.
    let s = Setup::new(&[
        ("broadcaster.batch_size", "50"),
        ("broadcaster.poll_interval", "1h"),
    ]);
    let mut c = s.cluster.connect();
    // The 55th broken row and the 10th event share key k, and are claimed together.
    c.batch_execute(
        "BEGIN; \
         ALTER TABLE broadcaster_outbox DISABLE TRIGGER broadcaster_outbox_accept; \
         INSERT INTO broadcaster_outbox (type, extensions, partition_key) \
              SELECT 'broken', '[1]', CASE WHEN g = 55 THEN 'k' END \
                FROM generate_series(1, 60) g; \
         ALTER TABLE broadcaster_outbox ENABLE ALWAYS TRIGGER broadcaster_outbox_accept; \
         INSERT INTO broadcaster_outbox (type, partition_key) \
              SELECT 'good', CASE WHEN g = 10 THEN 'k' END FROM generate_series(1, 20) g; \
         COMMIT;",
    )
    .expect("write");
    let entries = s.redis.wait_entries(DEFAULT_STREAM, 19);
    assert!(entries.iter().all(|e| e.get("ce_type") == Some("good")));
    std::thread::sleep(Duration::from_secs(1));
    let entries = s.redis.entries(DEFAULT_STREAM);
    assert_eq!(entries.len(), 19, "k's event waits behind its broken row");
    assert!(entries.iter().all(|e| e.get("ce_partitionkey").is_none()));
    let failed: i64 = common::wait_for("60 failed attempts", common::DEADLINE, || {
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM broadcaster_outbox o JOIN broadcaster_failures f USING (seq) \
                  WHERE o.type = 'broken' AND f.attempts >= 1 \
                    AND f.last_error LIKE '%JSON object%'",
                &[],
            )
            .expect("count")
            .get(0);
        (n == 60).then_some(n)
    });
    assert_eq!(failed, 60);
    // The trigger still checks an UPDATE that changes the event.
    let err = c
        .execute(
            "UPDATE broadcaster_outbox SET type = 'also broken' WHERE type = 'broken'",
            &[],
        )
        .expect_err("still refused");
    assert_eq!(
        err.code(),
        Some(&postgres::error::SqlState::INVALID_PARAMETER_VALUE)
    );
}
