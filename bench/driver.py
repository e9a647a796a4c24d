"""Measures broadcaster against its ceilings on a cluster and redis-server started by run.sh.

Prints one markdown table: drain rate, commit-to-Redis latency (one by one, and at a steady
10,000 events/s), producer cost against a plain INSERT, and the worker's memory while draining a
large backlog; with the ceilings (pipelined XADD alone, the Postgres claim+retire loop alone)
measured in the same run.
"""

import argparse
import json
import multiprocessing as mp
import os
import re
import statistics
import subprocess
import sys
import time

import psycopg
import redis
from psycopg import sql

STREAM = "broadcaster:postgres"
# About 300 bytes of JSON, like a typical business event.
DATA = json.dumps(
    {
        "order_id": 123456,
        "customer": {"id": "c-00042", "name": "Ada Lovelace", "tier": "gold"},
        "items": [{"sku": "SKU-%04d" % i, "qty": i, "price": "19.99"} for i in range(1, 4)],
        "total": "59.97",
        "currency": "EUR",
        "note": "x" * 40,
    }
)


def pg(args, autocommit=True):
    return psycopg.connect(
        host="127.0.0.1", port=args.pg_port, user="postgres", dbname="postgres", autocommit=autocommit
    )


def rds(args):
    return redis.Redis(host="127.0.0.1", port=args.redis_port)


def set_backend(args, name):
    """'paused' is no backend at all: the worker backs off without claiming anything."""
    with pg(args) as c:
        c.execute(sql.SQL("ALTER SYSTEM SET broadcaster.backend = {}").format(sql.Literal(name)))
        c.execute("SELECT pg_reload_conf()")


def fill(args, n, partition_keys=100):
    with pg(args) as c:
        c.execute(
            "INSERT INTO broadcaster_outbox (type, data, partition_key) "
            "SELECT 'bench.drain', %s::json, 'k' || (g %% %s) FROM generate_series(1, %s) g",
            (DATA, partition_keys, n),
        )
        c.execute("VACUUM ANALYZE broadcaster_outbox")


def wait_outbox_empty(args, timeout=600):
    deadline = time.time() + timeout
    with pg(args) as c:
        while time.time() < deadline:
            if c.execute("SELECT count(*) FROM broadcaster_outbox").fetchone()[0] == 0:
                return
            time.sleep(0.05)
    raise SystemExit("outbox did not drain")


def worker_pid(args):
    with pg(args) as c:
        row = c.execute(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'broadcaster relay'"
        ).fetchone()
        return row[0]


def rss_kib(pid):
    fields = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            k, _, v = line.partition(":")
            fields[k] = v.strip()
    return int(fields["RssAnon"].split()[0]), int(fields["VmRSS"].split()[0])


def drain(args, n, sample_memory=False):
    """Events/s from resuming the worker to the last entry in Redis, for an n-event backlog."""
    r = rds(args)
    r.delete(STREAM)
    set_backend(args, "paused")
    fill(args, n)
    samples = []
    pid = worker_pid(args)
    t0 = time.perf_counter()
    set_backend(args, "redis")
    while r.xlen(STREAM) < n:
        if sample_memory:
            samples.append(rss_kib(pid))
        time.sleep(0.005 if not sample_memory else 0.1)
    elapsed = time.perf_counter() - t0
    wait_outbox_empty(args)
    r.delete(STREAM)
    return n / elapsed, samples


def ceiling_xadd(args, n):
    """Pipelined XADD of the same entry layout, one connection, batches of 1,000."""
    fields = [
        "ce_specversion", "1.0", "ce_id", "0b5b3d9e-58a4-4c44-9a83-6a4a8fd0c7a1",
        "ce_source", "postgresql:///postgres", "ce_type", "bench.drain",
        "content-type", "application/json", "ce_time", "2026-11-27T07:00:00.123456+00:00",
        "ce_partitionkey", "k42", "data", DATA,
    ]
    out = subprocess.run(
        ["redis-benchmark", "-p", str(args.redis_port), "-n", str(n), "-P", "1000", "-c", "1",
         "--csv", "XADD", "ceiling", "*"] + fields,
        capture_output=True, text=True, check=True,
    ).stdout
    rds(args).delete("ceiling")
    # The row ends with rps and six latency columns; the quoted command before them may hold
    # anything, so count from the end.
    return float(re.findall(r'"([0-9.]+)"', out.strip().splitlines()[-1])[-7])


CLAIM_LOOP = """
CREATE OR REPLACE PROCEDURE bench_claim_retire_loop(batch int) LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    SET LOCAL synchronous_commit = off;
    LOOP
        WITH claimed AS (
            DELETE FROM broadcaster_outbox WHERE ctid = ANY (ARRAY(
                SELECT o.ctid FROM broadcaster_outbox o ORDER BY o.seq LIMIT batch))
            RETURNING seq, id, type, source, subject, "time", datacontenttype, dataschema,
                      data, partition_key, extensions::text, stream)
        SELECT count(*) INTO n FROM claimed;
        EXIT WHEN n = 0;
        COMMIT;
        SET LOCAL synchronous_commit = off;
    END LOOP;
END $$;
"""


def ceiling_postgres(args, n):
    """The worker's claim (a DELETE returning the rows), in a loop inside Postgres, without
    Redis."""
    set_backend(args, "paused")
    fill(args, n)
    with pg(args) as c:
        c.execute(CLAIM_LOOP)
        t0 = time.perf_counter()
        c.execute("CALL bench_claim_retire_loop(1000)")
        elapsed = time.perf_counter() - t0
        c.execute("DROP PROCEDURE bench_claim_retire_loop(int)")
    set_backend(args, "redis")
    return n / elapsed


def consume(args, expected, ready, out):
    """Blocked XREAD from the end of the stream; records when each ce_id is read."""
    r = rds(args)
    last = "$"
    seen = {}
    ready.set()
    while len(seen) < expected:
        reply = r.xread({STREAM: last}, block=5000, count=10000)
        now = time.time_ns()
        if not reply:
            break
        for _, entries in reply:
            for entry_id, fields in entries:
                last = entry_id
                seen[fields[b"ce_id"].decode()] = now
    out.put(seen)


def latency(args, producers, per_producer, per_tx, pause):
    """Commit acknowledged to the producer → entry read by a blocked XREAD, per event."""
    ready = mp.Event()
    results = mp.Queue()
    consumer = mp.Process(target=consume, args=(args, producers * per_producer, ready, results))
    consumer.start()
    ready.wait()
    time.sleep(0.2)
    committed = mp.Queue()
    procs = [
        mp.Process(target=produce, args=(args, per_producer, per_tx, pause, committed))
        for _ in range(producers)
    ]
    for p in procs:
        p.start()
    commit_times = {}
    for _ in procs:
        commit_times.update(committed.get())
    for p in procs:
        p.join()
    seen = results.get()
    consumer.join()
    lat = sorted((seen[i] - t) / 1e6 for i, t in commit_times.items() if i in seen)
    missing = len(commit_times) - len(lat)
    if missing:
        raise SystemExit("%d events never arrived" % missing)
    return lat


def produce(args, count, per_tx, pause, out):
    times = {}
    with pg(args) as c:
        next_at = time.perf_counter()
        for _ in range(count // per_tx):
            rows = c.execute(
                "SELECT broadcaster_publish('bench.latency', %s::json)::text FROM generate_series(1, %s)",
                (DATA, per_tx),
            ).fetchall()
            t = time.time_ns()
            for (i,) in rows:
                times[i] = t
            next_at += pause
            delay = next_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
    out.put(times)


def pct(xs, p):
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


PUBLISH_SQL = "SELECT broadcaster_publish('bench.tps', '%s'::json);\n" % DATA.replace("'", "''")
PLAIN_SQL = "INSERT INTO bench_plain (type, data) VALUES ('bench.tps', '%s'::json);\n" % DATA.replace("'", "''")
# The same with a jsonb argument (to_jsonb(NEW) in a trigger, psycopg's Jsonb): publish prints
# it into the outbox's json column, as the plain INSERT's assignment cast does.
PUBLISH_JSONB_SQL = PUBLISH_SQL.replace("::json)", "::jsonb)")
PLAIN_JSONB_SQL = PLAIN_SQL.replace("::json)", "::jsonb)")


def pgbench_tps(args, script, clients, seconds):
    path = "/tmp/broadcaster-bench-%d.sql" % os.getpid()
    with open(path, "w") as f:
        f.write(script)
    out = subprocess.run(
        ["pgbench", "-h", "127.0.0.1", "-p", str(args.pg_port), "-U", "postgres", "-n",
         "-c", str(clients), "-j", "2", "-T", str(seconds), "-f", path, "postgres"],
        capture_output=True, text=True, check=True,
    ).stdout
    os.unlink(path)
    return float(re.search(r"tps = ([0-9.]+)", out).group(1))


PRODUCER_ROUNDS = 8
DRAIN_ROUNDS = 3


def producer_cost(args, clients, seconds, rounds=PRODUCER_ROUNDS, publish_sql=PUBLISH_SQL,
                  plain_sql=PLAIN_SQL, modes=("paused", "draining")):
    """Median of per-round ratios, each round a plain INSERT run next to a publish run: the
    shared machine drifts by more than the difference measured, so pairs are taken close
    together, and every other pair runs publish first, so that a drift within pairs favours
    neither. First with the relay paused (the transaction's own cost), then with it draining
    what the publish run wrote, competing for the same two cores."""
    with pg(args) as c:
        c.execute(
            "CREATE TABLE IF NOT EXISTS bench_plain (seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
            "id uuid NOT NULL DEFAULT gen_random_uuid(), type text NOT NULL, "
            "time timestamptz NOT NULL DEFAULT now(), data json)"
        )
    results = {}
    for mode in modes:
        set_backend(args, "paused" if mode == "paused" else "redis")
        pairs = []
        for i in range(rounds):
            if i % 2 == 0:
                plain = pgbench_tps(args, plain_sql, clients, seconds)
                publish = pgbench_tps(args, publish_sql, clients, seconds)
            else:
                publish = pgbench_tps(args, publish_sql, clients, seconds)
                plain = pgbench_tps(args, plain_sql, clients, seconds)
            pairs.append((publish / plain, publish, plain))
            if mode == "draining":
                wait_outbox_empty(args)
        results[mode] = sorted(pairs)[len(pairs) // 2]
    set_backend(args, "redis")
    wait_outbox_empty(args)
    rds(args).delete(STREAM)
    return tuple(results[m] for m in modes)


CLUSTER_STREAMS = 64


def cluster_drain(args, ports, n):
    """Events/s draining an n-event backlog into a Redis Cluster, over CLUSTER_STREAMS streams
    (bench:0 ... bench:63, spread over the primaries' slots), 100 partition keys."""
    nodes = [redis.Redis(host="127.0.0.1", port=p) for p in ports]
    streams = ["bench:%d" % i for i in range(CLUSTER_STREAMS)]

    def total():
        count = 0
        for s in streams:
            for node in nodes:
                try:
                    count += node.xlen(s)
                    break
                except redis.ResponseError:  # MOVED: another node's
                    continue
        return count

    def clear():
        for node in nodes:
            node.flushall()

    clear()
    set_backend(args, "paused")
    with pg(args) as c:
        c.execute(
            "INSERT INTO broadcaster_outbox (type, data, partition_key, stream) "
            "SELECT 'bench.drain', %s::json, 'k' || (g %% 100), 'bench:' || (g %% 100 %% %s) "
            "FROM generate_series(1, %s) g",
            (DATA, CLUSTER_STREAMS, n),
        )
        c.execute("VACUUM ANALYZE broadcaster_outbox")
    t0 = time.perf_counter()
    set_backend(args, "redis")
    wait_outbox_empty(args)
    elapsed = time.perf_counter() - t0
    got = total()
    clear()
    if got != n:
        raise SystemExit("cluster drain: %d of %d entries in the streams" % (got, n))
    return n / elapsed


def cluster_ceiling_xadd(args, ports, n):
    """Pipelined XADD of the same entries alone, against the same cluster: one redis-benchmark
    per primary, in parallel, each into a stream that primary serves, n in all."""
    fields = [
        "ce_specversion", "1.0", "ce_id", "0b5b3d9e-58a4-4c44-9a83-6a4a8fd0c7a1",
        "ce_source", "postgresql:///postgres", "ce_type", "bench.drain",
        "content-type", "application/json", "ce_time", "2026-11-27T07:00:00.123456+00:00",
        "ce_partitionkey", "k42", "data", DATA,
    ]
    procs = []
    t0 = time.perf_counter()
    for port in ports:
        node = redis.Redis(host="127.0.0.1", port=port)
        # A stream this primary serves: the first bench:<i> whose slot is its own.
        owned = [r for r in node.execute_command("CLUSTER", "SLOTS") if r[2][1] == port]
        stream = next(
            "ceiling:%d" % i for i in range(100000)
            if any(a <= node.execute_command("CLUSTER", "KEYSLOT", "ceiling:%d" % i) <= b
                   for a, b, *_ in owned))
        procs.append((node, stream, subprocess.Popen(
            ["redis-benchmark", "-p", str(port), "-n", str(n // len(ports)), "-P", "1000",
             "-c", "1", "-q", "XADD", stream, "*"] + fields,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
    for _, _, proc in procs:
        proc.wait()
    elapsed = time.perf_counter() - t0
    for node, stream, _ in procs:
        node.delete(stream)
    return n / elapsed


def wait_main(args):
    """What WAIT costs: commit-to-Redis latency, events one by one, with
    broadcaster.redis_wait_replicas 0 and then 1 (the replica run.sh started on loopback)."""
    figures = {}
    for replicas in (0, 1):
        with pg(args) as c:
            c.execute("ALTER SYSTEM SET broadcaster.redis_wait_replicas = %d" % replicas)
            c.execute("SELECT pg_reload_conf()")
        time.sleep(1)
        lat = latency(args, producers=1, per_producer=3000, per_tx=1, pause=0.002)
        figures[replicas] = lat
    with pg(args) as c:
        c.execute("ALTER SYSTEM RESET broadcaster.redis_wait_replicas")
        c.execute("SELECT pg_reload_conf()")
    for replicas, lat in figures.items():
        print("| latency one by one, redis_wait_replicas %d | p50 %.2f / p99 %.2f ms | "
              "(the cost of WAIT) | %d events, one every 2 ms; one replica on loopback |"
              % (replicas, pct(lat, 50), pct(lat, 99), len(lat)))


def cluster_main(args):
    """The cluster rows alone: run.sh calls it with the cluster's primaries once the single
    server's rows are printed."""
    ports = [int(p) for p in args.cluster_ports.split(",")]
    with pg(args) as c:
        c.execute("ALTER SYSTEM SET broadcaster.redis_url = %s" % sql.Literal(
            "redis://127.0.0.1:%d" % ports[0]).as_string(c))
        c.execute("SELECT pg_reload_conf()")
    cluster_drain(args, ports, 20_000)  # warm-up: connections, slot map
    ceilings, rates = [], []
    for _ in range(DRAIN_ROUNDS):
        ceilings.append(cluster_ceiling_xadd(args, ports, args.drain_events))
        rates.append(cluster_drain(args, ports, args.drain_events))
    ceiling, rate = statistics.median(ceilings), statistics.median(rates)
    print("| drain %d events into a Redis Cluster (%d primaries, %d streams) | %.0f events/s | "
          "— | median of %d runs (%s); %.2f of pipelined XADD alone against "
          "the same cluster, one client per primary in parallel (%.0f/s) |"
          % (args.drain_events, len(ports), CLUSTER_STREAMS, rate, DRAIN_ROUNDS,
             ", ".join("%.0f" % r for r in sorted(rates)), rate / ceiling, ceiling))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pg-port", type=int, required=True)
    ap.add_argument("--redis-port", type=int, required=True)
    ap.add_argument("--drain-events", type=int, default=200_000)
    ap.add_argument("--memory-events", type=int, default=1_000_000)
    ap.add_argument("--settings", default="")
    ap.add_argument("--cluster-ports", default="",
                    help="a Redis Cluster's primaries: measure its drain only")
    ap.add_argument("--wait", action="store_true",
                    help="the Redis server has a replica: measure what WAIT costs only")
    args = ap.parse_args()
    if args.cluster_ports:
        return cluster_main(args)
    if args.wait:
        return wait_main(args)

    rows = []
    def row(measure, value, target, note=""):
        rows.append((measure, value, target, note))
        print("  %s: %s" % (measure, value), file=sys.stderr, flush=True)

    print("warming up", file=sys.stderr, flush=True)
    drain(args, 20_000)

    # Each drain next to its ceilings, three times: the median of each, so that one stall of
    # the shared host does not make the figure.
    xadds, claims, rates = [], [], []
    for _ in range(DRAIN_ROUNDS):
        xadds.append(ceiling_xadd(args, args.drain_events))
        claims.append(ceiling_postgres(args, args.drain_events))
        rates.append(drain(args, args.drain_events)[0])
    xadd, claim, rate = (statistics.median(x) for x in (xadds, claims, rates))
    row("drain %d events" % args.drain_events, "%.0f events/s" % rate, "≥ 100,000 events/s",
        "median of %d runs (%s); %.2f of pipelined XADD alone (%.0f/s); "
        "%.2f of the Postgres claim+retire loop alone (%.0f/s)"
        % (DRAIN_ROUNDS, ", ".join("%.0f" % r for r in sorted(rates)),
           rate / xadd, xadd, rate / claim, claim))

    lat = latency(args, producers=1, per_producer=6000, per_tx=1, pause=0.002)
    row("latency, events committed one by one", "p50 %.2f / p95 %.2f / p99 %.2f / max %.2f ms"
        % (pct(lat, 50), pct(lat, 95), pct(lat, 99), lat[-1]), "p50 ≤ 0.5 ms, p99 ≤ 2 ms",
        "%d events, one every 2 ms" % len(lat))

    lat = latency(args, producers=4, per_producer=25_000, per_tx=25, pause=0.01)
    row("latency at 10,000 events/s steady", "p50 %.2f / p95 %.2f / p99 %.2f / max %.2f ms"
        % (pct(lat, 50), pct(lat, 95), pct(lat, 99), lat[-1]), "p99 ≤ 10 ms",
        "4 producers × 100 tx/s × 25 events, %d events" % len(lat))

    paused, draining = producer_cost(args, clients=4, seconds=5)
    row("producer cost: TPS publish ÷ TPS plain INSERT", "%.2f (relay paused) / %.2f (relay draining)"
        % (paused[0], draining[0]), "≥ 0.90",
        "median of %d pairs of 5 s runs, publish first in every other; median pair %.0f vs %.0f TPS paused, %.0f vs %.0f draining; "
        "pgbench -c 4 -j 2, one event per transaction"
        % (PRODUCER_ROUNDS, paused[1], paused[2], draining[1], draining[2]))
    (jsonb,) = producer_cost(args, clients=4, seconds=5, publish_sql=PUBLISH_JSONB_SQL,
                             plain_sql=PLAIN_JSONB_SQL, modes=("paused",))
    row("producer cost, jsonb data: TPS publish ÷ TPS plain INSERT", "%.2f (relay paused)" % jsonb[0],
        "≥ 0.95", "median of %d pairs; median pair %.0f vs %.0f TPS; the plain INSERT casts jsonb "
        "to the json column, publish prints it" % (PRODUCER_ROUNDS, jsonb[1], jsonb[2]))

    _, samples = drain(args, args.memory_events, sample_memory=True)
    anon = [s[0] for s in samples]
    total = [s[1] for s in samples]
    row("worker memory draining %d events" % args.memory_events,
        "RssAnon %.1f → max %.1f MiB" % (anon[0] / 1024, max(anon) / 1024), "≤ 64 MiB, flat",
        "VmRSS max %.1f MiB (includes shared buffers it touched)" % (max(total) / 1024))

    print("| measure | broadcaster | target | notes |")
    print("|---|---|---|---|")
    for r in rows:
        print("| %s | %s | %s | %s |" % r)


if __name__ == "__main__":
    main()
