"""Reads a Kafka topic from its beginning with confluent-kafka (Confluent's Python client, its own
librdkafka build) and parses every record with the CloudEvents SDK for Python's Kafka binding,
binary or structured mode as the record's content-type says. Stops once at least COUNT records
have arrived and every partition has been read to its end, or after TIMEOUT seconds. Prints one
JSON line per record: where it was (partition, offset), its key and headers as they arrived, and
the event as the SDK read it.
Run by tests/kafka.rs: consume_kafka.py BOOTSTRAP TOPIC COUNT TIMEOUT [USER PASSWORD]; with
KAFKA_TLS_DIR set, over TLS with that folder's ca.pem, client.pem and client.key.
"""

import json
import os
import sys
import time

from cloudevents.core.bindings.kafka import KafkaMessage, from_binary_event, from_structured_event
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

bootstrap, topic, count, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
settings = {
    "bootstrap.servers": bootstrap,
    "group.id": "broadcaster-tests",
    "enable.auto.commit": False,
    "enable.partition.eof": True,
}
tls = os.environ.get("KAFKA_TLS_DIR")
login = len(sys.argv) > 6
settings["security.protocol"] = ("sasl_" if login else "") + ("ssl" if tls else "plaintext")
if login:
    settings.update(
        {
            "sasl.mechanisms": "SCRAM-SHA-512",
            "sasl.username": sys.argv[5],
            "sasl.password": sys.argv[6],
        }
    )
if tls:
    settings.update(
        {
            "ssl.ca.location": os.path.join(tls, "ca.pem"),
            "ssl.certificate.location": os.path.join(tls, "client.pem"),
            "ssl.key.location": os.path.join(tls, "client.key"),
        }
    )
consumer = Consumer(settings)
partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
at_end = set()
received = 0
deadline = time.monotonic() + timeout
while time.monotonic() < deadline and (received < count or len(at_end) < len(partitions)):
    message = consumer.poll(0.2)
    if message is None:
        continue
    if message.error():
        if message.error().code() == KafkaError._PARTITION_EOF:
            at_end.add(message.partition())
            continue
        raise SystemExit(f"consume: {message.error()}")
    at_end.discard(message.partition())
    received += 1
    headers = {k: v for k, v in (message.headers() or [])}
    value = message.value() or b""
    kafka = KafkaMessage(headers, message.key(), value)
    content_type = headers.get("content-type", b"").decode()
    if content_type.startswith("application/cloudevents+json"):
        event = from_structured_event(kafka)
    else:
        event = from_binary_event(kafka)
    attributes = {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in event.get_attributes().items()}
    print(
        json.dumps(
            {
                "partition": message.partition(),
                "offset": message.offset(),
                "key": message.key().decode() if message.key() is not None else None,
                "headers": {k: v.decode() if v is not None else None for k, v in headers.items()},
                "value": value.decode(),
                "attributes": {k: str(v) for k, v in attributes.items()},
            }
        ),
        flush=True,
    )
consumer.close()
