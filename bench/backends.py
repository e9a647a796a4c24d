"""Each backend beside Redis drained against its broker, next to that broker's ceiling.

For each kind: a server of the kind pointing at a closed port, N events committed for it (no
partition key, 1,000 per batch, as the ceiling's windows), then ALTER SERVER to the broker:
the drain is timed from that commit to the outbox empty. The ceiling is bench/ceiling.rs: the
same number of messages of the same shape, from a plain client loop of the crate the backend
uses, with the same confirmations. Target: drain >= 0.5 x ceiling.

Then the commit-to-delivery latency of each: 2,000 events committed one by one (one per
transaction, 2 ms apart) to the same server, each timed from its commit acknowledged to the
producer until a subscriber of the broker (bench/ceiling.rs's listen-*: a core NATS
subscription, a RabbitMQ queue of its own bound to the exchange, an MQTT QoS 1 subscription, a
Kafka consumer of every partition from its end, an HTTP receiver) has it, both clocks the machine's wall clock.
"""

import argparse
import re
import socket
import subprocess
import sys
import time

import psycopg

DATA = '{"order_id": 1, "customer": "c-1", "total": 99.90, "items": [1, 2, 3]}'


def closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def pg(args):
    return psycopg.connect(host="127.0.0.1", port=args.pg_port, user="postgres",
                           dbname="postgres", autocommit=True)


def drain(args, kind, url, options, n, mapping=False):
    """Drain rate of n events for a server of `kind`. The broker's address comes last, with
    ALTER SERVER (or, with `mapping`, ALTER USER MAPPING: a URL with a password); until then
    the relay backs off."""
    name = "bench_" + kind
    with pg(args) as c:
        c.execute(f"DROP SERVER IF EXISTS {name} CASCADE")
        if mapping:
            c.execute(f"CREATE SERVER {name} FOREIGN DATA WRAPPER broadcaster "
                      f"OPTIONS (backend '{kind}'{options})")
            c.execute(f"CREATE USER MAPPING FOR PUBLIC SERVER {name} "
                      f"OPTIONS (url '{closed(kind)}')")
        else:
            c.execute(f"CREATE SERVER {name} FOREIGN DATA WRAPPER broadcaster "
                      f"OPTIONS (backend '{kind}', url '{closed(kind)}'{options})")
        c.execute(
            "INSERT INTO broadcaster_outbox (type, data, backend) "
            "SELECT 'bench.event', %s::json, %s FROM generate_series(1, %s)",
            (DATA, name, n),
        )
        time.sleep(1)
        started = time.monotonic()
        if mapping:
            c.execute(f"ALTER USER MAPPING FOR PUBLIC SERVER {name} OPTIONS (SET url '{url}')")
        else:
            c.execute(f"ALTER SERVER {name} OPTIONS (SET url '{url}')")
        while True:
            left = c.execute(
                "SELECT count(*) FROM broadcaster_outbox WHERE backend = %s", (name,)
            ).fetchone()[0]
            if left == 0:
                break
            if time.monotonic() - started > 600:
                sys.exit(f"{kind}: {left} events still pending after 600 s")
            time.sleep(0.02)
        return n / (time.monotonic() - started)


def pct(xs, p):
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def latency(args, kind, listen, n=2000, pause=0.002):
    """Commit acknowledged to the producer -> message read by the broker's subscriber, per
    event, in ms, sorted. `listen` is the listen-* command; the server bench_<kind> exists."""
    name = "bench_" + kind
    # n events and the warm-up one.
    listener = subprocess.Popen([args.ceiling, *map(str, listen), str(n + 1)],
                                stdout=subprocess.PIPE, text=True)
    if listener.stdout.readline().strip() != "ready":
        sys.exit(f"{kind}: the listener did not subscribe")
    # Warm: the relay connected to the broker and idle (a server just created or altered
    # starts its relay or reconnects first).
    with pg(args) as c:
        c.execute("INSERT INTO broadcaster_outbox (type, data, backend) "
                  "VALUES ('bench.warm', %s::json, %s)", (DATA, name))
        started = time.monotonic()
        while c.execute("SELECT count(*) FROM broadcaster_outbox WHERE backend = %s",
                        (name,)).fetchone()[0]:
            if time.monotonic() - started > 60:
                sys.exit(f"{kind}: the warm-up event still pending after 60 s")
            time.sleep(0.05)
    time.sleep(0.5)
    committed = {}
    with pg(args) as c:
        next_at = time.perf_counter()
        for _ in range(n):
            (i,) = c.execute(
                "INSERT INTO broadcaster_outbox (type, data, backend) "
                "VALUES ('bench.latency', %s::json, %s) RETURNING id::text",
                (DATA, name),
            ).fetchone()
            committed[i] = time.time_ns()
            next_at += pause
            delay = next_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
    out, _ = listener.communicate(timeout=120)
    seen = dict(line.split() for line in out.splitlines() if line.strip())
    lat = sorted((int(seen[i]) - t) / 1e6 for i, t in committed.items() if i in seen)
    if len(lat) < n:
        sys.exit(f"{kind}: {n - len(lat)} of {n} events never reached the listener")
    return lat


def closed(kind):
    port = closed_port()
    return {
        "nats": f"nats://127.0.0.1:{port}",
        "amqp": f"amqp://127.0.0.1:{port}/%2f",
        "mqtt": f"mqtt://127.0.0.1:{port}",
        "webhook": f"http://127.0.0.1:{port}/",
        "kafka": f"kafka://127.0.0.1:{port}",
    }[kind]


def ceiling(args, *command):
    out = subprocess.run([args.ceiling, *map(str, command)], check=True,
                         capture_output=True, text=True).stdout
    m = re.search(r"= (\d+)/s", out)
    return float(m.group(1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pg-port", type=int, required=True)
    ap.add_argument("--ceiling", required=True)
    ap.add_argument("--nats", required=True)
    ap.add_argument("--amqp", required=True)
    ap.add_argument("--mqtt", required=True)
    ap.add_argument("--webhook", required=True)
    ap.add_argument("--kafka", required=True)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--only", help="one kind (nats, amqp, mqtt, kafka, webhook)")
    args = ap.parse_args()
    n = args.events
    with pg(args) as c:
        c.execute("ALTER SYSTEM SET broadcaster.retry_max_delay = '100ms'")
        c.execute("SELECT pg_reload_conf()")
    mqtt_host, mqtt_port = args.mqtt.rsplit(":", 1)
    cases = [
        ("nats", args.nats, ", stream 'bench.events'",
         ("nats", args.nats, "bench.ceiling", n),
         ("listen-nats", args.nats, "bench.events")),
        ("amqp", args.amqp, ", exchange 'bench', stream 'bench.events'",
         ("amqp", args.amqp, "bench", "bench.ceiling", n),
         ("listen-amqp", args.amqp, "bench", "bench.events")),
        ("mqtt", f"mqtt://{args.mqtt}", ", stream 'bench/events'",
         ("mqtt", mqtt_host, mqtt_port, "bench/ceiling", n),
         ("listen-mqtt", mqtt_host, mqtt_port, "bench/events")),
        ("kafka", f"kafka://{args.kafka}", ", stream 'bench.events'",
         ("kafka", args.kafka, "bench.ceiling", n),
         ("listen-kafka", args.kafka, "bench.latency")),
        ("webhook", args.webhook + "/in", ", connections '4'",
         ("webhook", args.webhook + "/ceiling", n, 4),
         ("listen-webhook", closed_port())),
    ]
    print()
    print(f"| backend ({n:,} events, no partition key) | drain | ceiling | ratio | target "
          "| latency one by one (2,000 events) |")
    print("|---|---|---|---|---|---|")
    for kind, url, options, command, listen in cases:
        if args.only and kind != args.only:
            continue
        # A password goes in a user mapping (the validator refuses it in a server's options).
        rate = drain(args, kind, url, options, n, mapping=(kind == "amqp"))
        top = ceiling(args, *command)
        if kind == "webhook":
            # Its own receiver, which records what arrives.
            with pg(args) as c:
                c.execute(f"ALTER SERVER bench_webhook OPTIONS "
                          f"(SET url 'http://127.0.0.1:{listen[1]}/in')")
        if kind == "kafka":
            # A topic of its own, so that the listener reads only the latency's events (on
            # tansu's SQLite storage, listening where the drain had left 100,000 records, the
            # p50 was 52 s: the broker's reads, not the relay).
            with pg(args) as c:
                c.execute("ALTER SERVER bench_kafka OPTIONS (SET stream 'bench.latency')")
        lat = latency(args, kind, listen)
        print(f"| {kind} | {rate:,.0f}/s | {top:,.0f}/s | {rate / top:.2f} | >= 0.5 "
              f"| p50 {pct(lat, 50):.2f} / p99 {pct(lat, 99):.2f} (max {lat[-1]:.1f}) ms |",
              flush=True)


if __name__ == "__main__":
    main()
