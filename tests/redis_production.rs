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

use common::{Cluster, PgClient, RedisCluster, Tally};

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
    fn start(port: u16, keys: usize, pause: Duration) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let handles = (0..keys)
            .map(|k| {
                let stop = stop.clone();
                std::thread::spawn(move || produce(port, k, pause, &stop))
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

fn produce(port: u16, k: usize, pause: Duration, stop: &AtomicBool) -> Vec<String> {
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
            &[&(k as i32), &n, &key, &stream_of(k, n)],
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
