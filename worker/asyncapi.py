"""The queue contract as an AsyncAPI 3.0 document (schema/asyncapi.yaml).

Built from the message models (the very JSON Schemas kept in schema/messages/, their
`$defs` moved to `components.schemas`), the queue names' defaults in Settings and what the
consumer declares, so it cannot drift from the code; a unit test compares the committed file
with `asyncapi_yaml()` and has the AsyncAPI parser validate it.

The document is the worker's view, as AsyncAPI documents are: it receives jobs from the
request queue and sends each reply to the job's `reply_to` with its `correlation_id`.

Written as JSON, which is YAML 1.2: the standard library writes it and reads it back (no
YAML package in the worker for one generated file), and YAML readers, the AsyncAPI parser
among them, read it as they read any YAML.

Over 400 lines (budget 460) on purpose: one document, whose channels and operations refer
to each other; split, the references would cross files.
"""

from __future__ import annotations

import inspect
import json
from importlib.metadata import version
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from worker.assembly import queue_config
from worker.messages import (
    SCHEMA_FILES,
    ChecksumExport,
    ExportChecksum,
    ExportEvent,
    ExportFailed,
    ExportFlushed,
    ExportReady,
    ExportReleased,
    ExportStatus,
    FlushExport,
    InspectExport,
    PrepareExport,
    ReleaseExport,
    message_schemas,
)
from worker.settings import NODE_ID_PATTERN, Settings
from worker.topology import EVENT_KINDS, MESSAGE_TYPES, request_queue_arguments

ASYNCAPI_VERSION = "3.0.0"
AMQP_BINDING_VERSION = "0.3.0"
#: The node id in routing keys: a channel parameter, since every appliance has its own.
NODE_ID_PARAMETER = "{node_id}"
#: Documentation only: the real brokers are EXPORT_WORKER_AMQP_URL.
SERVER_HOST = "rabbitmq.example"

#: What the worker answers each request with when it succeeds (ExportFailed otherwise).
SUCCESS_REPLIES: dict[type[BaseModel], type[BaseModel]] = {
    PrepareExport: ExportReady,
    ReleaseExport: ExportReleased,
    FlushExport: ExportFlushed,
    InspectExport: ExportStatus,
    ChecksumExport: ExportChecksum,
}
#: Operation ids, one per request: the worker receives them all from one queue.
OPERATIONS: dict[type[BaseModel], str] = {
    PrepareExport: "prepareExport",
    ReleaseExport: "releaseExport",
    FlushExport: "flushExport",
    InspectExport: "inspectExport",
    ChecksumExport: "checksumExport",
}

_HEADER = (
    "# The queue contract of nbd-export-worker, AsyncAPI 3.0, written as JSON (YAML 1.2).\n"
    "# Generated from worker/messages.py and worker/settings.py by `nbd-export-worker\n"
    "# schemas` (worker/asyncapi.py): do not edit; tests/unit/test_asyncapi.py checks it.\n"
)


def _message_ids() -> dict[type[BaseModel], str]:
    # The JSON Schema file's stem names the message, as schedulers already know it.
    return {model: name.removesuffix(".json") for name, model in SCHEMA_FILES.items()}


def _summary(model: type[BaseModel]) -> str:
    doc = inspect.getdoc(model) or model.__name__
    return " ".join(doc.split("\n\n", 1)[0].split())


def _rewrite_refs(node: Any) -> Any:
    """`node` with pydantic's `#/$defs/X` refs pointing at `#/components/schemas/X`."""
    if isinstance(node, dict):
        return {
            key: (
                value.replace("#/$defs/", "#/components/schemas/", 1)
                if key == "$ref" and isinstance(value, str)
                else _rewrite_refs(value)
            )
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_rewrite_refs(item) for item in node]
    return node


def component_schemas() -> dict[str, Any]:
    """Each message's JSON Schema, as in schema/messages/, keyed by its model's name, with the
    `$defs` of all of them alongside (one definition per name: they must agree)."""
    schemas: dict[str, Any] = {}
    texts = message_schemas()
    for name, model in SCHEMA_FILES.items():
        schema = json.loads(texts[name])
        definitions = schema.pop("$defs", {})
        for key, definition in [*definitions.items(), (model.__name__, schema)]:
            definition = _rewrite_refs(definition)
            if schemas.setdefault(key, definition) != definition:
                raise ValueError(f"two different schemas named {key}: rename one of them")
    return schemas


def _properties_schemas(reply_queue: str) -> dict[str, Any]:
    # reply_to and correlation_id are AMQP message properties, not entries of the headers
    # table; AsyncAPI's runtime expressions only reach them as `$message.header#/...`.
    correlation_id = {
        "type": "string",
        "description": "AMQP property correlation_id: set by the scheduler on a job, copied "
        "by the worker onto its reply (absent on the reply when the job had none).",
    }
    return {
        "JobProperties": {
            "title": "JobProperties",
            "description": "The AMQP message properties of a job that the worker reads.",
            "type": "object",
            "properties": {
                "reply_to": {
                    "type": "string",
                    "description": "AMQP property reply_to: the queue the reply goes to, "
                    "through the default exchange. Without it, or when that queue no "
                    f"longer exists, the reply goes to the queue {reply_queue}.",
                },
                "correlation_id": correlation_id,
            },
        },
        "ReplyProperties": {
            "title": "ReplyProperties",
            "description": "The AMQP message properties of a reply (persistent, JSON).",
            "type": "object",
            "properties": {
                "correlation_id": correlation_id,
                "content_type": {"type": "string", "const": "application/json"},
                "delivery_mode": {"type": "integer", "const": 2},
            },
        },
    }


def _amqp(binding: dict[str, Any]) -> dict[str, Any]:
    return {"amqp": {**binding, "bindingVersion": AMQP_BINDING_VERSION}}


def _queue(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """A durable queue the worker declares, with its arguments."""
    queue = {"name": name, "durable": True, "exclusive": False, "autoDelete": False}
    return _amqp({"is": "queue", "queue": queue, "x-arguments": arguments})


def _refs(prefix: str, ids: list[str]) -> dict[str, Any]:
    return {message_id: {"$ref": f"{prefix}/{message_id}"} for message_id in ids}


def asyncapi_document(settings: Settings | None = None) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of the queue contract.

    `settings` names the exchange and queues; default: Settings' defaults, never the
    environment (that is what schema/asyncapi.yaml holds). Its node_id is not used: the
    node is a parameter of the routing keys.
    """
    if settings is None:
        # model_construct: the fields' defaults, without reading EXPORT_WORKER_* variables.
        settings = Settings.model_construct(node_id=NODE_ID_PARAMETER)
    else:
        settings = settings.model_copy(update={"node_id": NODE_ID_PARAMETER})
    # What the consumer declares its queues and bindings from, built as the service builds it.
    queues = queue_config(settings)
    ids = _message_ids()
    requests = [ids[model] for model in SUCCESS_REPLIES]
    reply_models: list[type[BaseModel]] = [*SUCCESS_REPLIES.values(), ExportFailed]
    replies = [ids[model] for model in reply_models]
    routing_keys = ", ".join(f"{kind}.<node_id>" for kind in MESSAGE_TYPES)

    messages: dict[str, Any] = {}
    for model, message_id in ids.items():
        is_request = message_id in requests
        if model is ExportEvent:  # not a job's: no correlation id, no reply properties
            messages[message_id] = {
                "name": message_id,
                "title": model.__name__,
                "summary": _summary(model),
                "contentType": "application/json",
                "payload": {"$ref": f"#/components/schemas/{model.__name__}"},
            }
            continue
        messages[message_id] = {
            "name": message_id,
            "title": model.__name__,
            "summary": _summary(model),
            "contentType": "application/json",
            "headers": {
                "$ref": "#/components/schemas/"
                + ("JobProperties" if is_request else "ReplyProperties")
            },
            "correlationId": {"$ref": "#/components/correlationIds/job"},
            "payload": {"$ref": f"#/components/schemas/{model.__name__}"},
        }

    channels: dict[str, Any] = {
        "jobs": {
            "address": queues.request_queue,
            "title": "The request queue",
            "description": "Durable quorum queue the worker declares and consumes; one "
            "queue carries every request, told apart by their `type` field "
            "(prepare-export when absent). Publish a job to it through the default exchange "
            "(routing key = the queue's name), or to the exchange "
            f"{queues.exchange} with routing key {routing_keys} (channel nodeJobs), which "
            "each worker binds to its own request queue. A job still failing transiently "
            f"after {queues.delivery_limit} returns is answered retries_exhausted and goes, "
            f"intact, to {queues.dead_letter_queue} (channel deadLetters).",
            "messages": _refs("#/components/messages", requests),
            # With the queue arguments the worker declares it with, from the consumer.
            "bindings": _queue(
                queues.request_queue,
                request_queue_arguments(queues.dead_letter_queue, queues.delivery_limit),
            ),
        },
        "nodeJobs": {
            "address": f"{{message_type}}.{NODE_ID_PARAMETER}",
            "title": "One node's jobs, by routing key",
            "description": f"The topic exchange {queues.exchange} (durable, declared by the "
            f"worker): each worker binds its request queue ({queues.request_queue}) with "
            f"routing keys {routing_keys} for its own node id, so that a scheduler addresses "
            "one appliance. Such a job arrives on the channel jobs.",
            "parameters": {
                "message_type": {
                    "description": "The job's `type`, by convention: the queue is bound "
                    "with every type, and the worker reads the type from the body.",
                    "enum": list(MESSAGE_TYPES),
                },
                "node_id": {
                    "description": "The appliance's EXPORT_WORKER_NODE_ID (unset: its host "
                    f"name, kept in its state directory), matching {NODE_ID_PATTERN}; "
                    "replies carry it as node_id.",
                    "examples": ["appliance-1"],
                },
            },
            "messages": _refs("#/components/messages", requests),
            "bindings": _amqp(
                {
                    "is": "routingKey",
                    "exchange": {
                        "name": queues.exchange,
                        "type": "topic",
                        "durable": True,
                        "autoDelete": False,
                    },
                }
            ),
        },
        "replies": {
            "address": None,
            "title": "A job's reply_to queue",
            "description": "The queue a job's reply_to names (the address is the job's): "
            "the worker publishes the reply there through the default exchange, persistent "
            "and mandatory, with the job's correlation_id. When that queue no longer "
            f"exists the reply goes to {queues.reply_queue} instead (channel replyQueue).",
            "messages": _refs("#/components/messages", replies),
            "bindings": _amqp({"is": "routingKey", "exchange": {"type": "default"}}),
        },
        "replyQueue": {
            "address": queues.reply_queue,
            "title": "The default reply queue",
            "description": "Durable quorum queue the worker declares: replies to jobs "
            "without reply_to, or whose reply_to queue no longer exists.",
            "messages": _refs("#/components/messages", replies),
            "bindings": _queue(queues.reply_queue, {"x-queue-type": "quorum"}),
        },
        "deadLetters": {
            "address": queues.dead_letter_queue,
            "title": "The dead-letter queue",
            "description": "Durable quorum queue the worker declares. Jobs the worker "
            "rejects (answered invalid_request, retries_exhausted or internal_error) are "
            "moved here, intact, by the broker (the request queue's dead-letter routing "
            "key); `nbd-export-worker dead-letters` lists and replays them.",
            "messages": _refs("#/components/messages", requests),
            "bindings": _queue(queues.dead_letter_queue, {"x-queue-type": "quorum"}),
        },
        "events": {
            "address": f"event.{NODE_ID_PARAMETER}.{{kind}}",
            "title": "One node's export-events",
            "description": f"Published by the worker to the topic exchange {queues.exchange} "
            "when a connection of an export begins or ends (sampled every "
            "EXPORT_WORKER_LIVE_SAMPLE_S): bind a queue of your own with "
            f"event.<node_id>.* or event.#. At most once: an event that cannot be published "
            "within the publish budget is dropped (logged, counted in "
            "nbd_export_events_dropped_total), never at a job's cost; a scheduler that must "
            "not miss one inspects the export (inspect-export). `seq` orders each export's "
            "events.",
            "parameters": {
                "node_id": {"description": "The appliance's node id.", "examples": ["appliance-1"]},
                "kind": {"description": "The event's kind.", "enum": list(EVENT_KINDS)},
            },
            "messages": _refs("#/components/messages", [ids[ExportEvent]]),
            "bindings": _amqp(
                {
                    "is": "routingKey",
                    "exchange": {
                        "name": queues.exchange,
                        "type": "topic",
                        "durable": True,
                        "autoDelete": False,
                    },
                }
            ),
        },
    }

    operations: dict[str, Any] = {}
    for model, reply in SUCCESS_REPLIES.items():
        operations[OPERATIONS[model]] = {
            "action": "receive",
            "channel": {"$ref": "#/channels/jobs"},
            "title": f"Serve a {ids[model]} job",
            "summary": _summary(model),
            "description": f"Answered with {ids[reply]} or {ids[ExportFailed]}. A job is "
            "acked only once its reply is confirmed by the broker. A transient failure is "
            "retried, then the job returned to the queue unanswered; on its last delivery it "
            "is answered retries_exhausted.",
            "messages": [{"$ref": f"#/channels/jobs/messages/{ids[model]}"}],
            "reply": {
                "address": {
                    "description": "The job's reply_to property.",
                    "location": "$message.header#/reply_to",
                },
                "channel": {"$ref": "#/channels/replies"},
                "messages": [
                    {"$ref": f"#/channels/replies/messages/{ids[reply]}"},
                    {"$ref": f"#/channels/replies/messages/{ids[ExportFailed]}"},
                ],
            },
            "bindings": _amqp({"ack": True}),
        }
    operations["replyToReplyQueue"] = {
        "action": "send",
        "channel": {"$ref": "#/channels/replyQueue"},
        "title": "Reply to the default reply queue",
        "summary": "The reply to a job without reply_to, or whose reply_to queue is gone.",
        "messages": [{"$ref": f"#/channels/replyQueue/messages/{m}"} for m in replies],
        "bindings": _amqp({"deliveryMode": 2, "mandatory": True}),
    }
    operations["publishExportEvent"] = {
        "action": "send",
        "channel": {"$ref": "#/channels/events"},
        "title": "Publish an export-event",
        "summary": _summary(ExportEvent),
        "messages": [{"$ref": f"#/channels/events/messages/{ids[ExportEvent]}"}],
        "bindings": _amqp({"deliveryMode": 2, "mandatory": True}),
    }
    operations["deadLetter"] = {
        "action": "send",
        "channel": {"$ref": "#/channels/deadLetters"},
        "title": "Dead-letter a job",
        "summary": "A job rejected without requeue, moved intact by the broker.",
        "messages": [{"$ref": f"#/channels/deadLetters/messages/{m}"} for m in requests],
    }

    schemas = component_schemas()
    for name, schema in _properties_schemas(queues.reply_queue).items():
        if schemas.setdefault(name, schema) is not schema:
            raise ValueError(f"a message model is named {name}: rename it")
    schemas = dict(sorted(schemas.items()))

    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "nbd-export-worker",
            "version": version("nbd-export-worker"),
            "description": "Serves VM disks as NBD exports for migration jobs: schedulers "
            "send prepare-export, release-export, flush-export, inspect-export and "
            "checksum-export jobs; the worker answers each with export-ready, "
            "export-released, export-flushed, export-status or export-checksum, or "
            "export-failed, to the job's reply_to with its correlation_id. "
            "It publishes an export-event when a connection of an export begins or ends.",
            "license": {"name": "Apache-2.0"},
        },
        "defaultContentType": "application/json",
        "servers": {
            "rabbitmq": {
                "host": f"{SERVER_HOST}:5672",
                "protocol": "amqp",
                "protocolVersion": "0.9.1",
                "description": "A placeholder: the brokers are EXPORT_WORKER_AMQP_URL (one "
                "URL, or a RabbitMQ cluster's nodes, comma-separated).",
            },
            "rabbitmq-tls": {
                "host": f"{SERVER_HOST}:5671",
                "protocol": "amqps",
                "protocolVersion": "0.9.1",
                "description": "The same over TLS (amqps:// URLs; the broker is verified).",
            },
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": schemas,
            "messages": messages,
            "correlationIds": {
                "job": {
                    "description": "The job's correlation_id, copied onto its reply (which "
                    "also carries the job's job_id).",
                    "location": "$message.header#/correlation_id",
                }
            },
        },
    }


def asyncapi_yaml() -> str:
    """The document as the text kept in schema/asyncapi.yaml."""
    return _HEADER + json.dumps(asyncapi_document(), indent=2) + "\n"


def write_asyncapi(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(asyncapi_yaml())
    return path
