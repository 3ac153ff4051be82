"""schema/asyncapi.yaml: in step with the models, valid to the AsyncAPI parser, and naming
what the consumer really declares.

The parser is @asyncapi/parser, run with node from tools/asyncapi/ (installed by
`scripts/install-system-deps.sh --with-test-tools`); without it these tests fail, never skip.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest

from worker import cli
from worker.assembly import queue_config
from worker.asyncapi import (
    OPERATIONS,
    SUCCESS_REPLIES,
    asyncapi_document,
    asyncapi_yaml,
)
from worker.consumer import JobConsumer
from worker.messages import SCHEMA_FILES, message_schemas
from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCUMENT = ROOT / "schema" / "asyncapi.yaml"
VALIDATOR = ROOT / "tools" / "asyncapi" / "validate.mjs"
PARSER_PACKAGE = ROOT / "tools" / "asyncapi" / "node_modules" / "@asyncapi" / "parser"
INSTALL = "run `sudo scripts/install-system-deps.sh --with-test-tools`"


def load(text: str) -> dict[str, Any]:
    """The document, read without a YAML library: it is JSON after its comment lines."""
    body = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    document: dict[str, Any] = json.loads(body)
    return document


def resolve(root: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = root
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def inline(node: Any, root: dict[str, Any]) -> Any:
    """`node` with every local $ref replaced by what it points at (the schemas have no
    cycles), so that schemas with their definitions in different places compare equal."""
    if isinstance(node, dict):
        if set(node) == {"$ref"}:
            return inline(resolve(root, node["$ref"]), root)
        return {key: inline(value, root) for key, value in node.items() if key != "$defs"}
    if isinstance(node, list):
        return [inline(item, root) for item in node]
    return node


def run_parser(path: Path) -> tuple[int, dict[str, Any]]:
    """The validator's exit code and report: {"parser", "parsed", "diagnostics"}."""
    node = shutil.which("node")
    if node is None:
        pytest.fail(f"node is not installed, so the AsyncAPI parser cannot run: {INSTALL}")
    if not (PARSER_PACKAGE / "package.json").is_file():
        pytest.fail(f"@asyncapi/parser is not installed in tools/asyncapi/: {INSTALL}")
    result = subprocess.run(
        [node, str(VALIDATOR), str(path)], capture_output=True, text=True, timeout=120
    )
    try:
        report: dict[str, Any] = json.loads(result.stdout)
    except ValueError:
        pytest.fail(f"the validator gave no report (exit {result.returncode}): {result.stderr}")
    return result.returncode, report


def errors(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [d for d in report["diagnostics"] if d["severity"] == "error"]


def test_asyncapi_file_matches_the_models() -> None:
    assert DOCUMENT.read_text() == asyncapi_yaml(), (
        "run `nbd-export-worker schemas` and commit the result"
    )


def test_the_schemas_command_writes_the_document_beside_the_json_schemas(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EXPORT_WORKER_NODE_ID", "schema-test")
    assert cli.main(["schemas", "--out", str(tmp_path / "messages")]) == 0
    assert (tmp_path / "asyncapi.yaml").read_text() == asyncapi_yaml()
    written = {p.name: p.read_text() for p in (tmp_path / "messages").iterdir()}
    assert written == message_schemas()


def test_the_asyncapi_parser_finds_no_errors() -> None:
    returncode, report = run_parser(DOCUMENT)
    # Warnings and hints are allowed, but shown (pytest -s, or on a failure).
    for diagnostic in report["diagnostics"]:
        print(f"asyncapi parser {report['parser']}: {json.dumps(diagnostic)}")
    assert report["parser"].split(".")[0] == "3", "AsyncAPI 3.0 needs @asyncapi/parser 3.x"
    assert errors(report) == []
    assert report["parsed"]
    assert returncode == 0


@pytest.mark.parametrize(
    ("break_it", "expected"),
    [
        # A payload pointing nowhere: what a $defs left unrewritten would be.
        (
            lambda d: d["components"]["schemas"]["ExportReady"]["properties"]["action"].update(
                {"$ref": "#/$defs/Action"}
            ),
            "#/$defs/Action",
        ),
        # Correlation must be a runtime expression, not a property name.
        (
            lambda d: d["components"]["correlationIds"]["job"].update(
                {"location": "correlation_id"}
            ),
            "location",
        ),
        # An operation may only send messages of its own channel.
        (
            lambda d: d["operations"]["prepareExport"]["messages"].append(
                {"$ref": "#/channels/replies/messages/export-ready"}
            ),
            "does not belong",
        ),
        # A routing key parameter must be described.
        (
            lambda d: d["channels"]["nodeJobs"]["parameters"].pop("node_id"),
            "node_id",
        ),
    ],
    ids=["dangling-ref", "bad-correlation-location", "foreign-message", "undescribed-parameter"],
)
def test_the_parser_reports_a_broken_document(
    tmp_path: Path, break_it: Callable[[dict[str, Any]], object], expected: str
) -> None:
    # Shows the check above can fail: the same parser run on broken copies of the document.
    document = copy.deepcopy(load(asyncapi_yaml()))
    break_it(document)
    broken = tmp_path / "asyncapi.yaml"
    broken.write_text(json.dumps(document))
    returncode, report = run_parser(broken)
    assert returncode == 1
    assert any(expected in d["message"] for d in errors(report)), report


def test_every_message_is_in_the_document_with_its_json_schema() -> None:
    document = load(asyncapi_yaml())
    messages = document["components"]["messages"]
    used = {
        resolve(document, ref["$ref"])["$ref"]
        for operation in document["operations"].values()
        for ref in [*operation["messages"], *operation.get("reply", {}).get("messages", [])]
    }
    texts = message_schemas()
    for name, model in SCHEMA_FILES.items():
        message_id = name.removesuffix(".json")
        message = messages[message_id]
        assert message["contentType"] == "application/json"
        payload = resolve(document, message["payload"]["$ref"])
        assert payload["title"] == model.__name__
        # The same schema as schema/messages/<name>, its $defs resolved either way.
        schema = json.loads(texts[name])
        assert inline(payload, document) == inline(schema, schema)
        assert f"#/components/messages/{message_id}" in used, f"no operation has {message_id}"


def test_replies_go_to_reply_to_with_the_correlation_id() -> None:
    document = load(asyncapi_yaml())
    receives = {k: v for k, v in document["operations"].items() if v["action"] == "receive"}
    assert set(receives) == set(OPERATIONS.values())
    for model, operation_id in OPERATIONS.items():
        operation = receives[operation_id]
        (request,) = operation["messages"]
        assert resolve(document, resolve(document, request["$ref"])["$ref"])["title"] == (
            model.__name__
        )
        reply = operation["reply"]
        assert reply["address"]["location"] == "$message.header#/reply_to"
        # The parser does not check this one: replies are messages of the reply channel.
        channel = reply["channel"]["$ref"]
        for ref in reply["messages"]:
            assert ref["$ref"].startswith(f"{channel}/messages/"), ref
            assert resolve(document, ref["$ref"])
        replies = [
            resolve(document, resolve(document, r["$ref"])["$ref"]) for r in reply["messages"]
        ]
        assert {m["title"] for m in replies} == {SUCCESS_REPLIES[model].__name__, "ExportFailed"}
    for name, message in document["components"]["messages"].items():
        if name == "export-event":  # published by the worker itself: not a job's
            assert "correlationId" not in message
            continue
        correlation = resolve(document, message["correlationId"]["$ref"])
        assert correlation["location"] == "$message.header#/correlation_id"
        headers = resolve(document, message["headers"]["$ref"])
        assert "correlation_id" in headers["properties"]


class FakeQueue:
    def __init__(self, name: str, bindings: list[tuple[str, str, str]]) -> None:
        self.name = name
        self._bindings = bindings

    async def bind(self, exchange: FakeExchange, routing_key: str) -> None:
        self._bindings.append((exchange.name, routing_key, self.name))


class FakeExchange:
    def __init__(self, name: str, kind: str) -> None:
        self.name = name
        self.kind = kind


class FakeChannel:
    """Records what the consumer declares."""

    def __init__(self) -> None:
        self.default_exchange = FakeExchange("", "direct")
        self.queues: dict[str, dict[str, Any]] = {}
        self.exchanges: dict[str, str] = {}
        self.bindings: list[tuple[str, str, str]] = []

    async def set_qos(self, *, prefetch_count: int) -> None:
        pass

    async def declare_queue(
        self, name: str, *, durable: bool, arguments: dict[str, Any]
    ) -> FakeQueue:
        assert durable
        self.queues[name] = arguments
        return FakeQueue(name, self.bindings)

    async def declare_exchange(self, name: str, kind: Any, *, durable: bool) -> FakeExchange:
        assert durable
        self.exchanges[name] = str(kind.value)
        return FakeExchange(name, str(kind.value))


async def test_the_document_names_what_the_consumer_declares() -> None:
    node = "appliance-1"
    settings = Settings.model_construct(node_id=node)
    channel = FakeChannel()
    consumer = JobConsumer(
        cast(Any, channel),
        cast(Any, None),
        cast(Any, None),
        cast(Any, None),
        queue_config(settings),
    )
    await consumer.declare()

    document = load(asyncapi_yaml())
    queues = {
        c["address"]: c["bindings"]["amqp"]
        for c in document["channels"].values()
        if c["bindings"]["amqp"]["is"] == "queue"
    }
    assert {name: b["x-arguments"] for name, b in queues.items()} == channel.queues
    assert all(b["queue"]["durable"] for b in queues.values())

    by_key = document["channels"]["nodeJobs"]
    exchange = by_key["bindings"]["amqp"]["exchange"]
    assert channel.exchanges == {exchange["name"]: exchange["type"]}
    kinds = by_key["parameters"]["message_type"]["enum"]
    documented = {
        (exchange["name"], by_key["address"].format(message_type=kind, node_id=node))
        for kind in kinds
    }
    assert {(e, key) for e, key, _ in channel.bindings} == documented
    assert {queue for _, _, queue in channel.bindings} == {document["channels"]["jobs"]["address"]}


def test_names_are_the_settings_defaults_not_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EXPORT_WORKER_EXCHANGE", "elsewhere")
    monkeypatch.setenv("EXPORT_WORKER_REQUEST_QUEUE", "elsewhere")
    monkeypatch.setenv("EXPORT_WORKER_NODE_ID", "appliance-9")
    document = asyncapi_document()
    assert document["channels"]["jobs"]["address"] == Settings.model_fields["request_queue"].default
    assert document["channels"]["replyQueue"]["address"] == (
        Settings.model_fields["reply_queue"].default
    )
    exchange = document["channels"]["nodeJobs"]["bindings"]["amqp"]["exchange"]["name"]
    assert exchange == Settings.model_fields["exchange"].default
    assert "appliance-9" not in asyncapi_yaml()


def test_other_settings_name_other_queues() -> None:
    settings = Settings.model_construct(
        node_id="appliance-1", exchange="x.jobs", request_queue="x.requests"
    )
    document = asyncapi_document(settings)
    assert document["channels"]["jobs"]["address"] == "x.requests"
    assert document["channels"]["deadLetters"]["address"] == "x.requests.dead"
    assert document["channels"]["nodeJobs"]["address"] == "{message_type}.{node_id}"
    assert document["channels"]["nodeJobs"]["bindings"]["amqp"]["exchange"]["name"] == "x.jobs"
