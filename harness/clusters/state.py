"""What both clusters share: distinct free ports, the bound on a node's start-up, and
their state (ports, pids) in `<root>/cluster.json`, which lets the command line manage
them across invocations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness.nbd import free_port

#: Bounded start-up: each node (or, for RabbitMQ, the nodes that boot together) must be
#: up within this, or the start fails and everything started is stopped.
START_TIMEOUT_S = 120.0


#: Ports handed out by this process: two nodes of one cluster never get the same one.
_TAKEN: set[int] = set()


def free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in _TAKEN:
            _TAKEN.add(port)
            ports.append(port)
    return ports


def save_state(root: Path, key: str, value: dict[str, object]) -> None:
    path = root.parent / "cluster.json"  # root is <cluster root>/rabbitmq or /galera
    state = json.loads(path.read_text()) if path.exists() else {}
    state[key] = json.loads(json.dumps(value, default=str))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(path)


def load_state(root: Path, key: str) -> dict[str, Any]:
    state = json.loads((root / "cluster.json").read_text())
    if key not in state:
        raise LookupError(f"no {key} cluster in {root}")
    data: dict[str, Any] = state[key]
    return data
