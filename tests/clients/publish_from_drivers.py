"""Publishes one event through each way a Python application passes JSON to
broadcaster_publish: psycopg 3 (Json, Jsonb, a plain string; by position and by name),
SQLAlchemy 2 (JSON and JSONB bind types) and Django (a JSONField value). Prints one line per
event: how it was sent, the id broadcaster_publish returned, and the JSON data sent.
Run by tests/publishing.rs against a cluster it started: publish_from_drivers.py PORT.
"""

import json
import sys

import psycopg
from psycopg.types.json import Json, Jsonb

PORT = int(sys.argv[1])
DSN = f"host=127.0.0.1 port={PORT} user=postgres dbname=postgres"


def emit(via, event_id, data):
    print(f"{via}\t{event_id}\t{json.dumps(data)}", flush=True)


def with_psycopg():
    with psycopg.connect(DSN, autocommit=True) as conn:
        for via, wrap in [("psycopg Json", Json), ("psycopg Jsonb", Jsonb), ("psycopg str", json.dumps)]:
            data = {"via": via, "n": 1, "nested": {"list": [1, 2.5, "x"]}}
            (event_id,) = conn.execute(
                "SELECT broadcaster_publish(%s, %s)::text", ("drivers", wrap(data))
            ).fetchone()
            emit(via, event_id, data)
            data = {"via": via + " by name"}
            (event_id,) = conn.execute(
                "SELECT broadcaster_publish(type => %s, data => %s, subject => %s)::text",
                ("drivers", wrap(data), "s"),
            ).fetchone()
            emit(via + " by name", event_id, data)


def with_sqlalchemy():
    from sqlalchemy import bindparam, create_engine, func, select
    from sqlalchemy.dialects.postgresql import JSON, JSONB

    engine = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{PORT}/postgres")
    with engine.begin() as conn:
        for via, kind in [("SQLAlchemy JSON", JSON), ("SQLAlchemy JSONB", JSONB)]:
            data = {"via": via, "amount": 12.5}
            statement = select(
                func.broadcaster_publish("drivers", bindparam("data", data, type_=kind))
            )
            event_id = str(conn.execute(statement).scalar_one())
            emit(via, event_id, data)
    engine.dispose()


def with_django():
    import django_setup

    django_setup.configure(PORT)
    from django.db import connection
    from django.db.models import JSONField

    data = {"via": "Django JSONField", "tags": ["a", "b"]}
    value = JSONField().get_db_prep_value(data, connection)
    with connection.cursor() as cursor:
        cursor.execute("SELECT broadcaster_publish(%s, %s)::text", ["drivers", value])
        (event_id,) = cursor.fetchone()
    emit("Django JSONField", event_id, data)


with_psycopg()
with_sqlalchemy()
with_django()
