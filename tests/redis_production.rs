//! The Redis backend against Redis as production runs it: a Redis Cluster (3 primaries, 3
//! replicas) through a live reshard, a manual failover and a killed primary; a primary and its
//! replica with `WAIT`; a server whose `proto-max-bulk-len` is smaller than an event; a server
//! whose memory policy may evict the streams. Each fault scenario counts produced, delivered,
//! duplicates and lost, and checks each partition key's order.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{Cluster, PgClient, Redis, RedisCluster, Sentinels, Tally, DEFAULT_STREAM};

/// Streams the cluster tests write to: spread over every primary's slots.
const STREAMS: usize = 24;

/// The stream of key `k`: `orders:<k mod STREAMS>`; a key of the form `x-<k>` also writes to
/// `audit:<k>`, in another slot, every third event, so that its events span slots.
fn stream_of(key: usize, n: i64) -> String {
    if key.is_multiple_of(5) && n % 3 == 0 {
        format!("audit:{key}")
    } else {
        format!("orders:{}", key % STREAMS)
    }
}

fn all_streams(keys: usize) -> Vec<String> {
    let mut streams: Vec<String> = (0..STREAMS).map(|s| format!("orders:{s}")).collect();
    streams.extend(
        (0..keys)
            .filter(|k| k % 5 == 0)
            .map(|k| format!("audit:{k}")),
    );
    streams
}

fn connect(port: u16) -> Option<PgClient> {
    let params =
        format!("host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=2");
    PgClient::connect(&params, postgres::NoTls).ok()
}

/// Producers: `keys` partition keys, one thread each, each committing one event per
/// transaction (key `k-<k>`, `data.n` counting up) until stopped.
struct Traffic {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<Vec<String>>>,
}

impl Traffic {
    /// Key `k`'s `n`th event goes to [`stream_of`]`(k, n)`.
    fn start(port: u16, keys: usize, pause: Duration) -> Traffic {
        Self::start_on(port, keys, pause, stream_of)
    }

    /// Key `k`'s `n`th event goes to `stream(k, n)`.
    fn start_on(
        port: u16,
        keys: usize,
        pause: Duration,
        stream: fn(usize, i64) -> String,
    ) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let handles = (0..keys)
            .map(|k| {
                let stop = stop.clone();
                std::thread::spawn(move || produce(port, k, pause, stream, &stop))
            })
            .collect();
        Traffic { stop, handles }
    }

    /// Stops the producers; the ids of the events they committed.
    fn finish(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.handles
            .into_iter()
            .flat_map(|h| h.join().expect("producer thread"))
            .collect()
    }
}

fn produce(
    port: u16,
    k: usize,
    pause: Duration,
    stream: fn(usize, i64) -> String,
    stop: &AtomicBool,
) -> Vec<String> {
    let mut committed = Vec::new();
    let mut client: Option<PgClient> = None;
    let key = format!("k-{k}");
    let mut n: i64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let Some(c) = client.as_mut() else {
            client = connect(port);
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let row = c.query_one(
            "SELECT broadcaster_publish('cluster.test', json_build_object('k', $1::int, 'n', $2::bigint), \
             partition_key => $3, stream => $4)::text",
            &[&(k as i32), &n, &key, &stream(k, n)],
        );
        match row {
            Ok(row) => {
                committed.push(row.get::<_, String>(0));
                n += 1;
            }
            Err(_) => client = None,
        }
        std::thread::sleep(pause);
    }
    committed
}

/// Publishes `per_key` events for each of `keys` keys, in one transaction per key.
fn publish_batch(c: &mut PgClient, keys: usize, per_key: i64) -> Vec<String> {
    let mut ids = Vec::new();
    for k in 0..keys {
        let mut tx = c.transaction().expect("BEGIN");
        for n in 0..per_key {
            let row = tx
                .query_one(
                    "SELECT broadcaster_publish('cluster.test', json_build_object('k', $1::int, 'n', $2::bigint), \
                     partition_key => $3, stream => $4)::text",
                    &[&(k as i32), &n, &format!("k-{k}"), &stream_of(k, n)],
                )
                .expect("broadcaster_publish");
            ids.push(row.get::<_, String>(0));
        }
        tx.commit().expect("COMMIT");
    }
    ids
}

/// A stream's entries in order, each as (event id, key index, n).
type StreamEntries = (String, Vec<(String, i64, i64)>);

/// Every entry of every stream.
fn read_all(redis: &RedisCluster, streams: &[String]) -> Vec<StreamEntries> {
    streams
        .iter()
        .map(|s| {
            let entries = redis
                .entries(s)
                .into_iter()
                .map(|e| {
                    let data: serde_json::Value =
                        serde_json::from_str(e.get("data").expect("data field")).expect("JSON");
                    (
                        e.event_id(),
                        data["k"].as_i64().expect("k"),
                        data["n"].as_i64().expect("n"),
                    )
                })
                .collect();
            (s.clone(), entries)
        })
        .collect()
}

/// Within each stream, the first delivery of each key's events comes in the order they were
/// published (`n` increasing); a resent batch may repeat events after them.
fn check_key_order(name: &str, streams: &[StreamEntries]) {
    for (stream, entries) in streams {
        let mut seen: HashSet<&str> = HashSet::new();
        let mut last: HashMap<i64, i64> = HashMap::new();
        for (id, k, n) in entries {
            if !seen.insert(id) {
                continue;
            }
            if let Some(prev) = last.insert(*k, *n) {
                assert!(
                    *n > prev,
                    "{name}: key k-{k} out of order in {stream}: {n} after {prev}"
                );
            }
        }
    }
}

/// Waits until the outbox is empty and every id of `produced` is in some stream, then counts.
fn settle(
    name: &str,
    pg: &Cluster,
    redis: &RedisCluster,
    keys: usize,
    produced: &[String],
) -> Tally {
    let streams = all_streams(keys);
    let mut c = pg.connect();
    common::wait_for(
        &format!("{name}: the outbox empty"),
        Duration::from_secs(120),
        || {
            c.query_one("SELECT count(*) = 0 FROM broadcaster_outbox", &[])
                .ok()
                .filter(|r| r.get::<_, bool>(0))
        },
    );
    let all = read_all(redis, &streams);
    check_key_order(name, &all);
    let delivered: Vec<String> = all
        .iter()
        .flat_map(|(_, entries)| entries.iter().map(|(id, _, _)| id.clone()))
        .collect();
    let tally = Tally::count(produced, &delivered);
    println!(
        "| {name} | {} | {} | {} | {} |",
        tally.produced, tally.delivered, tally.duplicates, tally.lost
    );
    tally
}

fn dead_and_failed(c: &mut PgClient) -> (i64, i64) {
    let row = c
        .query_one(
            "SELECT count(*) FILTER (WHERE dead), count(*) FROM broadcaster_failures",
            &[],
        )
        .expect("failures");
    (row.get(0), row.get(1))
}

/// A PostgreSQL cluster publishing to `redis` through the default backend, given one node's
/// URL only.
fn cluster_setup(redis: &RedisCluster, settings: &[(&str, &str)]) -> Cluster {
    let pg = Cluster::start(&redis.url(), settings);
    pg.connect()
        .batch_execute("CREATE EXTENSION broadcaster")
        .expect("CREATE EXTENSION");
    pg
}

#[test]
fn a_redis_cluster_gets_every_event_in_every_slot() {
    let redis = RedisCluster::start(3, 1);
    let pg = cluster_setup(&redis, &[]);
    let mut c = pg.connect();
    let keys = 40;
    let produced = publish_batch(&mut c, keys, 30);
    let tally = settle(
        "cluster, 1,200 events, 40 keys",
        &pg,
        &redis,
        keys,
        &produced,
    );
    assert_eq!((tally.lost, tally.unexpected), (0, 0), "{tally:?}");
    assert_eq!(tally.duplicates, 0, "nothing failed: nothing resent");
    assert_eq!(dead_and_failed(&mut c), (0, 0), "no event failed");
    // Every primary got some of them.
    let served: HashSet<u16> = all_streams(keys)
        .iter()
        .map(|s| redis.port_for_key(s))
        .collect();
    assert_eq!(served.len(), 3, "the streams span the 3 primaries");
}

/// Traffic through a live reshard, a manual failover and a SIGKILLed primary, in turn: nothing
/// lost, every key in order, nothing dead. `WAIT 1`, so that what a killed primary
/// acknowledged is on its replica; the killed node comes back as a replica, as an operator
/// would bring it back (until then its former replica, now a primary, has no replica to
/// acknowledge its slots' batches).
#[test]
fn a_redis_cluster_reshards_fails_over_and_loses_a_primary_without_losing_an_event() {
    let mut redis = RedisCluster::start(3, 1);
    let pg = cluster_setup(
        &redis,
        &[
            ("broadcaster.redis_wait_replicas", "1"),
            ("broadcaster.retry_max_delay", "2000"),
        ],
    );
    let mut c = pg.connect();
    let keys = 12;
    let traffic = Traffic::start(pg.port, keys, Duration::from_millis(20));
    std::thread::sleep(Duration::from_secs(2));

    // A live reshard: 2,000 slots from the first primary to the second, events flowing.
    let primaries = redis.primaries();
    let started = Instant::now();
    let status = redis
        .reshard(primaries[0], primaries[1], 2000)
        .wait()
        .expect("redis-cli --cluster reshard");
    assert!(status.success(), "reshard: {status}");
    println!("reshard of 2,000 slots took {:?}", started.elapsed());
    redis.wait_ok();

    // A manual failover of the primary that serves orders:0.
    let port = redis.port_for_key("orders:0");
    let replica = redis.replicas_of(port)[0];
    redis.failover(replica);
    std::thread::sleep(Duration::from_secs(2));

    // The primary serving orders:1, killed; its replica takes over.
    let port = redis.port_for_key("orders:1");
    let started = Instant::now();
    redis.kill(port);
    redis.wait_ok();
    println!("cluster ok again {:?} after the kill", started.elapsed());
    // Until the killed node is back, as a replica of its former replica, `WAIT 1` can't be
    // met for its slots: their events wait, none is lost.
    std::thread::sleep(Duration::from_secs(2));
    redis.restart(port);
    redis.wait_ok();
    std::thread::sleep(Duration::from_secs(3));

    let produced = traffic.finish();
    assert!(
        produced.len() > 500,
        "only {} events produced",
        produced.len()
    );
    let tally = settle(
        "cluster: reshard, failover, SIGKILL",
        &pg,
        &redis,
        keys,
        &produced,
    );
    assert_eq!((tally.lost, tally.unexpected), (0, 0), "{tally:?}");
    assert_eq!(dead_and_failed(&mut c).0, 0, "no event dead");
}

/// Events of one stream (the default), entries as (event id, key index, n).
fn stream_entries(entries: Vec<common::Entry>) -> Vec<(String, i64, i64)> {
    entries
        .into_iter()
        .map(|e| {
            let data: serde_json::Value =
                serde_json::from_str(e.get("data").expect("data field")).expect("JSON");
            (
                e.event_id(),
                data["k"].as_i64().unwrap_or(-1),
                data["n"].as_i64().unwrap_or(-1),
            )
        })
        .collect()
}

fn wait_outbox_empty(c: &mut PgClient, deadline: Duration) {
    common::wait_for("the outbox empty", deadline, || {
        c.query_one("SELECT count(*) = 0 FROM broadcaster_outbox", &[])
            .ok()
            .filter(|r| r.get::<_, bool>(0))
    });
}

fn publish_plain(c: &mut PgClient, n: usize, key: &str) -> Vec<String> {
    (0..n)
        .map(|i| {
            c.query_one(
                "SELECT broadcaster_publish('wait.test', json_build_object('k', 0, 'n', $1::int), partition_key => $2)::text",
                &[&(i as i32), &key],
            )
            .expect("broadcaster_publish")
            .get(0)
        })
        .collect()
}

/// Through Sentinel: the relay knows only the sentinels; the primary is killed mid-traffic, the
/// sentinels promote its replica, the relay finds it by itself. `WAIT 1`, and the killed server
/// comes back as the new primary's replica (it keeps nothing on disk, so it must not come back
/// as a primary: see [`Sentinels::restart_as_replica_of`]): nothing lost, every key in order.
#[test]
fn sentinel_failover_mid_traffic_loses_nothing() {
    let mut redis = Sentinels::start();
    let sentinels: Vec<String> = redis
        .sentinel_ports()
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    let url = format!(
        "redis+sentinel://{}/{}",
        sentinels.join(","),
        redis.master_name()
    );
    let pg = Cluster::start(
        &url,
        &[
            ("broadcaster.redis_wait_replicas", "1"),
            ("broadcaster.retry_max_delay", "2000"),
        ],
    );
    let mut c = pg.connect();
    c.batch_execute("CREATE EXTENSION broadcaster")
        .expect("CREATE EXTENSION");
    let keys = 6;
    let traffic = Traffic::start_on(pg.port, keys, Duration::from_millis(10), |_, _| {
        DEFAULT_STREAM.to_string()
    });
    std::thread::sleep(Duration::from_secs(2));
    let started = Instant::now();
    let old = redis.kill_primary();
    let new = redis.wait_failover(old);
    println!(
        "sentinels promoted {new} {:?} after {old} was killed",
        started.elapsed()
    );
    redis.restart_as_replica_of(old, new);
    std::thread::sleep(Duration::from_secs(4));
    let produced = traffic.finish();
    wait_outbox_empty(&mut c, Duration::from_secs(120));
    let entries = stream_entries(redis.entries(DEFAULT_STREAM));
    println!(
        "read from {}: {}",
        redis.primary_port(),
        redis.describe(DEFAULT_STREAM)
    );
    check_key_order("sentinel", &[(DEFAULT_STREAM.to_string(), entries.clone())]);
    let delivered: Vec<String> = entries.into_iter().map(|(id, _, _)| id).collect();
    let tally = Tally::count(&produced, &delivered);
    println!(
        "| sentinel: primary killed | {} | {} | {} | {} |",
        tally.produced, tally.delivered, tally.duplicates, tally.lost
    );
    assert!(tally.produced > 300, "{tally:?}");
    assert_eq!((tally.lost, tally.unexpected), (0, 0), "{tally:?}");
    assert_eq!(dead_and_failed(&mut c).0, 0, "no event dead");
}

/// Sentinels and servers over TLS only, as far as the relay knows (`rediss+sentinel://` naming
/// the sentinels' TLS ports), each requiring a client certificate the test's CA signed and a
/// password: the relay finds the primary with the configured CA, client certificate and the
/// URL's password (the sentinels answer `NOAUTH` without it), and after the primary is killed,
/// the promoted replica (`WAIT 1`, as in the plain test). Counted: nothing lost, nothing dead.
#[test]
fn sentinels_over_mutual_tls_with_a_password_find_the_primary_and_follow_a_failover() {
    let dir = std::path::PathBuf::from(format!("/tmp/bc-sentinel-tls-{}", std::process::id()));
    common::make_certificates(&dir);
    let path = |f: &str| dir.join(f).to_string_lossy().into_owned();
    let password = "s3cret/with@odd:chars";
    let mut redis = Sentinels::start_secure(&dir, password);
    let sentinels: Vec<String> = redis
        .sentinel_tls_ports()
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    let encoded: String = password
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    let url = format!(
        "rediss+sentinel://:{encoded}@{}/{}",
        sentinels.join(","),
        redis.master_name()
    );
    let (ca, cert, key) = (path("ca.pem"), path("client.pem"), path("client.key"));
    let pg = Cluster::start(
        &url,
        &[
            ("broadcaster.redis_tls_ca_file", ca.as_str()),
            ("broadcaster.redis_tls_cert_file", cert.as_str()),
            ("broadcaster.redis_tls_key_file", key.as_str()),
            // Acknowledged once the replica has it: what the killed primary had, survives.
            ("broadcaster.redis_wait_replicas", "1"),
            ("broadcaster.retry_max_delay", "2000"),
        ],
    );
    let mut c = pg.connect();
    c.batch_execute("CREATE EXTENSION broadcaster")
        .expect("CREATE EXTENSION");
    let mut produced = publish_plain(&mut c, 100, "before");
    redis.wait_for_ids_on_primary(&produced);
    let old = redis.kill_primary();
    let new = redis.wait_failover(old);
    redis.restart_as_replica_of(old, new);
    produced.extend(publish_plain(&mut c, 100, "after"));
    wait_outbox_empty(&mut c, Duration::from_secs(60));
    let delivered = redis.event_ids(DEFAULT_STREAM);
    let tally = Tally::count(&produced, &delivered);
    println!(
        "| sentinel over mutual TLS: primary killed | {} | {} | {} | {} |",
        tally.produced, tally.delivered, tally.duplicates, tally.lost
    );
    assert_eq!(
        (tally.produced, tally.lost, tally.unexpected),
        (200, 0, 0),
        "{tally:?}"
    );
    assert_eq!(dead_and_failed(&mut c).0, 0, "no event dead");
    let log = pg.log();
    assert!(
        !log.contains(password) && !log.contains(&encoded),
        "the password is in the server log"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// What `WAIT` is for, counted: the replica stops replicating (`REPLICAOF NO ONE`: a partition,
/// or a replica promoted while it lagged), events are published, the primary is killed, and the
/// relay is pointed at the promoted replica. Without `wait_replicas`, Redis acknowledged every
/// event, the relay deleted their rows, and the promoted replica never had them: all lost.
/// With `wait_replicas 1`, `WAIT` answered 0, so none counted as delivered; all arrive at the
/// promoted replica (which gets a replica of its own).
#[test]
fn wait_for_a_replica_keeps_what_a_failover_loses_without_it() {
    let mut lost = Vec::new();
    for wait in [false, true] {
        let mut primary = Redis::start();
        let replica = Redis::start_replica_of(primary.port);
        let mut settings = vec![("broadcaster.retry_max_delay", "1000")];
        if wait {
            settings.push(("broadcaster.redis_wait_replicas", "1"));
            settings.push(("broadcaster.redis_wait_timeout", "200"));
        }
        let pg = Cluster::start(&primary.url(), &settings);
        let mut c = pg.connect();
        c.batch_execute("CREATE EXTENSION broadcaster")
            .expect("CREATE EXTENSION");
        // Replication works: the first event reaches the replica.
        let first = publish_plain(&mut c, 1, "k");
        replica.wait_for_ids(DEFAULT_STREAM, &first, common::DEADLINE);

        let mut promoted: redis::Connection = replica.connection();
        redis::cmd("REPLICAOF")
            .arg("NO")
            .arg("ONE")
            .query::<()>(&mut promoted)
            .expect("REPLICAOF NO ONE");
        let produced = publish_plain(&mut c, 50, "k");
        if wait {
            // WAIT answers 0: the events stay pending.
            std::thread::sleep(Duration::from_secs(2));
            let pending: i64 = c
                .query_one("SELECT count(*) FROM broadcaster_outbox", &[])
                .expect("count")
                .get(0);
            assert_eq!(pending, 50, "with WAIT 1, nothing counts as delivered");
        } else {
            wait_outbox_empty(&mut c, common::DEADLINE);
        }
        primary.kill();
        let _second = wait.then(|| Redis::start_replica_of(replica.port));
        pg.set_and_reload("broadcaster.redis_url", &replica.url());
        wait_outbox_empty(&mut c, common::DEADLINE);
        let delivered = replica.event_ids(DEFAULT_STREAM);
        let tally = Tally::count(&produced, &delivered);
        println!(
            "| primary killed, replica promoted, wait_replicas {} | {} | {} | {} | {} |",
            u8::from(wait),
            tally.produced,
            tally.delivered,
            tally.duplicates,
            tally.lost
        );
        lost.push(tally.lost);
    }
    assert_eq!(lost, vec![50, 0], "lost without WAIT, then with WAIT 1");
}

/// An event larger than the server's `proto-max-bulk-len` (1 MB here, 2 MiB event): refused
/// before it is sent, charged its attempts, dead with the sizes in `last_error`; other keys'
/// events flow meanwhile.
#[test]
fn an_event_over_the_servers_bulk_limit_goes_dead_and_others_flow() {
    let error = over_the_bulk_limit(&[]);
    assert!(
        error.contains("2097154 bytes") && error.contains("proto-max-bulk-len of 1048576"),
        "{error}"
    );
}

/// The same on a server that refuses `CONFIG` (as managed services do), so the relay can't
/// ask its limit: the server drops the connection on the event, the relay asks it whether it
/// drops an argument that long, learns it does, and the event goes dead as above.
#[test]
fn an_event_over_the_bulk_limit_of_a_server_refusing_config_goes_dead_and_others_flow() {
    let error = over_the_bulk_limit(&["--rename-command", "CONFIG", ""]);
    assert!(
        error.contains("2097154 bytes") && error.contains("refused an argument of 2097154 bytes"),
        "{error}"
    );
}

/// The same on a Redis Cluster whose nodes refuse `CONFIG`: learnt of the node that serves
/// the big event's stream.
#[test]
fn an_event_over_the_bulk_limit_of_a_cluster_refusing_config_goes_dead_and_others_flow() {
    let redis = RedisCluster::start_with_args(
        3,
        0,
        2000,
        &[
            "--proto-max-bulk-len",
            "1mb",
            "--rename-command",
            "CONFIG",
            "",
        ],
    );
    let pg = cluster_setup(
        &redis,
        &[
            ("broadcaster.max_event_size", "4MB"),
            ("broadcaster.max_attempts", "2"),
        ],
    );
    let mut c = pg.connect();
    let big = "x".repeat(2 * 1024 * 1024);
    c.query_one(
        "SELECT broadcaster_publish('big', to_json($1::text), partition_key => 'big', stream => 'orders:7')",
        &[&big],
    )
    .expect("a 2 MiB event is within max_event_size");
    // 20 others, to streams on every node, the big event's among them.
    let others: Vec<String> = (0..20)
        .map(|i| {
            c.query_one(
                "SELECT broadcaster_publish('small', json_build_object('n', $1::int), partition_key => 'small' || $1::int, stream => 'orders:' || $1::int % 10)::text",
                &[&i],
            )
            .expect("broadcaster_publish")
            .get(0)
        })
        .collect();
    let error = wait_dead(&mut c);
    wait_outbox_empty_but_dead(&mut c);
    let delivered: Vec<String> = (0..10)
        .flat_map(|s| redis.event_ids(&format!("orders:{s}")))
        .collect();
    let tally = Tally::count(&others, &delivered);
    assert_eq!((tally.lost, tally.delivered), (0, 20), "{tally:?}");
    assert!(
        error.contains("2097154 bytes") && error.contains("refused an argument of 2097154 bytes"),
        "{error}"
    );
}

/// Waits until the outbox holds only dead events.
fn wait_outbox_empty_but_dead(c: &mut PgClient) {
    common::wait_for("only dead events left", common::DEADLINE, || {
        c.query_one(
            "SELECT count(*) = 0 FROM broadcaster_outbox o WHERE NOT EXISTS (SELECT 1 FROM broadcaster_failures f WHERE f.seq = o.seq AND f.dead)",
            &[],
        )
        .ok()?
        .get::<_, bool>(0)
        .then_some(())
    });
}

/// Waits for the one dead event, dead after 2 attempts: its `last_error`.
fn wait_dead(c: &mut PgClient) -> String {
    let (attempts, dead, error): (i32, bool, String) =
        common::wait_for("the big event dead", common::DEADLINE, || {
            let row = c
                .query_opt(
                    "SELECT attempts, dead, last_error FROM broadcaster_failures WHERE dead",
                    &[],
                )
                .ok()??;
            Some((row.get(0), row.get(1), row.get(2)))
        });
    println!("last_error: {error}");
    assert!(dead && attempts == 2, "attempts {attempts}");
    error
}

/// A 2 MiB event and 20 others of another key, to a server whose `proto-max-bulk-len` is 1 MB
/// (and `args`): the others delivered, the big one dead after its 2 attempts. Its
/// `last_error`.
fn over_the_bulk_limit(args: &[&str]) -> String {
    let mut server_args = vec!["--proto-max-bulk-len", "1mb"];
    server_args.extend_from_slice(args);
    let redis = Redis::start_with(&server_args);
    let pg = Cluster::start(
        &redis.url(),
        &[
            ("broadcaster.max_event_size", "4MB"),
            ("broadcaster.max_attempts", "2"),
        ],
    );
    let mut c = pg.connect();
    c.batch_execute("CREATE EXTENSION broadcaster")
        .expect("CREATE EXTENSION");
    let big = "x".repeat(2 * 1024 * 1024);
    c.query_one(
        "SELECT broadcaster_publish('big', to_json($1::text), partition_key => 'big')",
        &[&big],
    )
    .expect("a 2 MiB event is within max_event_size");
    let started = Instant::now();
    let others = publish_plain(&mut c, 20, "small");
    let ids = redis.wait_for_ids(DEFAULT_STREAM, &others, Duration::from_secs(10));
    println!(
        "20 other events delivered {:?} after the big one",
        started.elapsed()
    );
    assert_eq!(Tally::count(&others, &ids).lost, 0);
    let error = wait_dead(&mut c);
    assert_eq!(
        redis.len(DEFAULT_STREAM),
        20,
        "only the others are in the stream"
    );
    error
}

/// A memory policy that may evict the stream: said once in the log, and in
/// `broadcaster_status.warning`; gone from status once the policy is fixed and the relay
/// reconnects.
#[test]
fn an_evicting_memory_policy_is_a_warning_in_status_and_the_log() {
    let redis = Redis::start_with(&["--maxmemory-policy", "allkeys-lru"]);
    let pg = Cluster::start(&redis.url(), &[]);
    let mut c = pg.connect();
    c.batch_execute("CREATE EXTENSION broadcaster")
        .expect("CREATE EXTENSION");
    let ids = publish_plain(&mut c, 3, "k");
    redis.wait_for_ids(DEFAULT_STREAM, &ids, common::DEADLINE);
    let warning: String = common::wait_for("the warning in status", common::DEADLINE, || {
        c.query_one("SELECT warning FROM broadcaster_status", &[])
            .ok()?
            .get::<_, Option<String>>(0)
    });
    assert!(warning.contains("allkeys-lru"), "{warning}");
    let ids = publish_plain(&mut c, 3, "k");
    redis.wait_for_ids(DEFAULT_STREAM, &ids, common::DEADLINE);
    assert_eq!(
        common::lines_with(&pg.log(), "maxmemory-policy is allkeys-lru").len(),
        1,
        "said once"
    );
    // Fixed, and the relay reconnected (it learns the policy when it connects).
    let mut r = redis.connection();
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .query::<()>(&mut r)
        .expect("CONFIG SET");
    redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .arg("SKIPME")
        .arg("yes")
        .query::<i64>(&mut r)
        .expect("CLIENT KILL");
    publish_plain(&mut c, 1, "k");
    common::wait_for("the warning gone", common::DEADLINE, || {
        c.query_one("SELECT warning IS NULL FROM broadcaster_status", &[])
            .ok()
            .filter(|row| row.get::<_, bool>(0))
    });
}

/// `maxlen` trimming entries a consumer group has not read: said in
/// `broadcaster_status.warning` (and the log), with the stream and the group.
#[test]
fn trimming_entries_a_group_has_not_read_is_a_warning() {
    let redis = Redis::start();
    let mut r = redis.connection();
    redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(DEFAULT_STREAM)
        .arg("billing")
        .arg("0")
        .arg("MKSTREAM")
        .query::<()>(&mut r)
        .expect("XGROUP CREATE");
    let pg = Cluster::start(&redis.url(), &[("broadcaster.redis_maxlen", "10")]);
    let mut c = pg.connect();
    c.batch_execute("CREATE EXTENSION broadcaster")
        .expect("CREATE EXTENSION");
    for _ in 0..5 {
        publish_batch_plain(&mut c, 200);
    }
    let warning: String = common::wait_for("the warning in status", common::DEADLINE, || {
        c.query_one("SELECT warning FROM broadcaster_status", &[])
            .ok()?
            .get::<_, Option<String>>(0)
    });
    println!("warning: {warning}");
    assert!(
        warning.contains("consumer group billing") && warning.contains(DEFAULT_STREAM),
        "{warning}"
    );
    assert_eq!(
        common::lines_with(&pg.log(), "consumer group billing had not read").len(),
        1,
        "said once in the log"
    );
}

/// `n` events in one transaction, to the default stream.
fn publish_batch_plain(c: &mut PgClient, n: i32) {
    c.execute(
        "SELECT count(broadcaster_publish('trim.test', json_build_object('n', g))) FROM generate_series(1, $1) g",
        &[&n],
    )
    .expect("broadcaster_publish");
}

/// The same on a Redis Cluster: the stream's consumer groups asked of the node serving it.
#[test]
fn trimming_unread_entries_on_a_cluster_is_a_warning() {
    let redis = RedisCluster::start(3, 0);
    let stream = "orders:7";
    redis.query_routed::<()>(
        stream,
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(stream)
            .arg("billing")
            .arg("0")
            .arg("MKSTREAM"),
    );
    let pg = cluster_setup(&redis, &[("broadcaster.redis_maxlen", "10")]);
    let mut c = pg.connect();
    for _ in 0..5 {
        c.execute(
            "SELECT count(broadcaster_publish('trim.test', json_build_object('n', g), stream => $1)) FROM generate_series(1, 200) g",
            &[&stream],
        )
        .expect("broadcaster_publish");
    }
    let warning: String = common::wait_for("the warning in status", common::DEADLINE, || {
        c.query_one("SELECT warning FROM broadcaster_status", &[])
            .ok()?
            .get::<_, Option<String>>(0)
    });
    assert!(
        warning.contains("consumer group billing") && warning.contains(stream),
        "{warning}"
    );
}
