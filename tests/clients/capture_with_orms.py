"""Writes rows through Django's ORM and SQLAlchemy's, to tables whose changes
broadcaster_capture turns into events (tests/capture.rs creates them), then reads the stream
and checks each event with the CloudEvents SDK's Kafka binding (the layout of binary mode).
Run as capture_with_orms.py PG_PORT REDIS_PORT; exits non-zero on the first mismatch.
"""

import datetime
import json
import sys
import time
from decimal import Decimal

import redis
from cloudevents.core.bindings.kafka import KafkaMessage, from_binary_event

PG_PORT, REDIS_PORT = int(sys.argv[1]), int(sys.argv[2])
STREAM = "capture"
BIG_NOTE = "n" * 100_000  # stored out of line (TOAST)


def django_writes():
    import django_setup

    django_setup.configure(PG_PORT)
    from django.db import models

    class Order(models.Model):
        customer_id = models.IntegerField()
        total = models.DecimalField(max_digits=10, decimal_places=2)
        password = models.TextField(default="")
        note = models.TextField(default="")

        class Meta:
            app_label = "shop"
            db_table = "orders"
            managed = False

    first = Order.objects.create(customer_id=7, total=Decimal("10.00"), password="s3cret")
    first.total = Decimal("20.00")
    first.save(update_fields=["total"])
    Order.objects.bulk_create(
        [Order(customer_id=8, total=Decimal(i)) for i in (1, 2, 3)]
    )
    big = Order.objects.create(customer_id=9, total=Decimal("5.00"), note=BIG_NOTE)
    big.total = Decimal("6.00")
    big.save(update_fields=["total"])  # the note is not rewritten: it stays TOASTed
    Order.objects.filter(id=first.id).delete()
    return first.id, big.id


def sqlalchemy_writes():
    from sqlalchemy import Column, Date, Integer, Numeric, Text, create_engine, insert
    from sqlalchemy.orm import Session, declarative_base

    Base = declarative_base()

    class OrderLine(Base):
        __tablename__ = "order_lines"
        order_id = Column(Integer, primary_key=True)
        line = Column(Integer, primary_key=True)
        sku = Column(Text)

    engine = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{PG_PORT}/postgres")
    with Session(engine) as session:
        session.add_all([OrderLine(order_id=1, line=1, sku="A"), OrderLine(order_id=1, line=2, sku="B")])
        session.commit()
        line = session.get(OrderLine, (1, 2))
        line.sku = "C"
        session.commit()
        session.delete(session.get(OrderLine, (1, 1)))
        session.commit()
    with engine.begin() as conn:
        from sqlalchemy import MetaData, Table

        meta = MetaData()
        audit = Table("audit_log", meta, autoload_with=conn)
        measurements = Table("measurements", meta, autoload_with=conn)
        conn.execute(insert(audit).values(message="hello"))
        conn.execute(
            insert(measurements),
            [
                {"id": 1, "at": datetime.date(2026, 1, 5), "value": 1},
                {"id": 1, "at": datetime.date(2026, 7, 5), "value": 2},
            ],
        )
    engine.dispose()


def events(n):
    r = redis.Redis(port=REDIS_PORT)
    deadline = time.time() + 60
    while r.xlen(STREAM) < n:
        if time.time() > deadline:
            sys.exit(f"only {r.xlen(STREAM)} of {n} events arrived")
        time.sleep(0.1)
    parsed = []
    for _, fields in r.xrange(STREAM):
        headers = {k.decode(): v for k, v in fields.items() if k != b"data"}
        parsed.append(from_binary_event(KafkaMessage(headers, None, fields.get(b"data", b""))))
    return parsed


def check(condition, what):
    if not condition:
        sys.exit(f"capture: {what}")


first_id, big_id = django_writes()
sqlalchemy_writes()
got = events(15)
check(len(got) == 15, f"{len(got)} events, want 15")

orders = [e for e in got if e.get_type().startswith("shop.order.")]
check(
    [e.get_type() for e in orders]
    == ["shop.order.created", "shop.order.updated"]
    + ["shop.order.created"] * 3
    + ["shop.order.created", "shop.order.updated", "shop.order.deleted"],
    f"order types {[e.get_type() for e in orders]}",
)
for e in orders:
    data = e.get_data()
    check(data["table"] == "public.orders", f"table {data['table']}")
    check("password" not in data["record"], "the excluded column is in the record")
    check("password" not in data.get("changes", {}), "the excluded column is in changes")
    check(e.get_subject() == str(data["record"]["id"]), f"subject {e.get_subject()}")
    check(
        e.get_extension("partitionkey") == f"public.orders:{data['record']['id']}",
        f"partition key {e.get_extension('partitionkey')}",
    )
    check("total_cents" in data["record"], "the generated column is missing")
    check(e.get_datacontenttype() == "application/json", "content type")
created, updated = orders[0].get_data(), orders[1].get_data()
check(updated["changes"] == {"total": 10.00, "total_cents": 1000}, f"changes {updated['changes']}")
check(updated["record"]["total"] == 20.00, "the record is the row after the update")
check(orders[-1].get_data()["record"]["id"] == first_id, "the delete carries the deleted row")
toasted = orders[-2].get_data()
check(toasted["record"]["note"] == BIG_NOTE, "the TOASTed column is in the update's record")
check("note" not in toasted["changes"], "an unchanged TOASTed column is not a change")

lines = [e for e in got if e.get_type().startswith("shop.line.")]
check(
    [(e.get_type(), e.get_subject()) for e in lines]
    == [("shop.line.created", "[1, 1]"), ("shop.line.created", "[1, 2]"),
        ("shop.line.updated", "[1, 2]"), ("shop.line.deleted", "[1, 1]")],
    f"lines {[(e.get_type(), e.get_subject()) for e in lines]}",
)
check(lines[2].get_data()["changes"] == {"sku": "B"}, "composite key update changes")

audit = [e for e in got if e.get_type().startswith("shop.audit.")]
check(len(audit) == 1 and audit[0].get_subject() is None, "a table without a key: no subject")
check(audit[0].get_extension("partitionkey") == "public.audit_log", "a table without a key: the table")

measured = [e for e in got if e.get_type().startswith("shop.measurement.")]
check(len(measured) == 2, f"{len(measured)} measurements")
for e in measured:
    check(e.get_data()["table"] == "public.measurements", "a partition names its partitioned table")
    check(e.get_extension("partitionkey") == "1", "partition_key=id")

print(json.dumps({"events": len(got), "orders": len(orders), "lines": len(lines)}))
