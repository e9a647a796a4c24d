"""Reads every entry of a stream and parses it with both generations of the CloudEvents SDK for
Python: the current one (cloudevents.core, its Kafka binding) and the legacy API
(cloudevents.v1), in binary or structured mode as the entry is. Prints one JSON line per entry:
its id, type, datacontenttype and data as each SDK read them, and the data's raw text.
Run by tests/relay.rs: parse_with_sdks.py REDIS_PORT STREAM.
"""

import json
import sys

import redis
from cloudevents.core.bindings.kafka import KafkaMessage, from_binary_event, from_structured_event
from cloudevents.v1 import kafka as legacy_kafka
from cloudevents.v1.http import from_json as legacy_from_json

port, stream = int(sys.argv[1]), sys.argv[2]
for _, fields in redis.Redis(port=port).xrange(stream):
    if b"cloudevent" in fields:
        body = fields[b"cloudevent"]
        raw = body.decode()
        current = from_structured_event(
            KafkaMessage({"content-type": b"application/cloudevents+json"}, None, body)
        )
        legacy = legacy_from_json(body)
    else:
        headers = {k.decode(): v for k, v in fields.items() if k != b"data"}
        value = fields.get(b"data", b"")
        raw = value.decode()
        current = from_binary_event(KafkaMessage(headers, None, value))
        legacy = legacy_kafka.from_binary(
            legacy_kafka.KafkaMessage(headers=headers, key=None, value=value),
            data_unmarshaller=lambda v: json.loads(v) if v else None,
        )
    print(
        json.dumps(
            {
                "id": [current.get_id(), legacy["id"]],
                "type": [current.get_type(), legacy["type"]],
                "datacontenttype": [current.get_datacontenttype(), legacy.get("datacontenttype")],
                "data": [current.get_data(), legacy.data],
                "raw": raw,
            }
        ),
        flush=True,
    )
