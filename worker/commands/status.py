"""`status`: each mapping with the live state of its export, as a table or JSON."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from worker.assembly import adapters, build_live
from worker.commands import ExitCode
from worker.devices import device_present
from worker.errors import ServerUnavailable, WorkerError
from worker.live import ExportView
from worker.live_sampler import live_state
from worker.metrics import build_metrics
from worker.nbd.files import link_target
from worker.nbd.server import NbdServer
from worker.nbd.wire import UNKNOWN, ExportInfo
from worker.repository import Repository
from worker.settings import Settings


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [[str(row[c]) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def _offers(flags: dict[str, bool] | None) -> str:
    """The data-path flags an export advertises, for the status table: flush,fua,trim,..."""
    if flags is None:
        return "-"
    names = {"can_flush": "flush", "can_fua": "fua", "can_trim": "trim", "can_zero": "zero"}
    names["can_multi_conn"] = "multi-conn"
    offered = [label for key, label in names.items() if flags.get(key)]
    if flags.get("read_only"):
        offered.insert(0, "read-only")
    return ",".join(offered) or "none"


def _bytes(count: int | None) -> str:
    """1536 -> 1.5K, for the status table."""
    if count is None:
        return "-"
    size = float(count)
    for unit in ("", "K", "M", "G", "T"):
        if size < 1024 or unit == "T":
            return f"{size:.0f}{unit}" if not unit else f"{size:.1f}{unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _idle(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for limit, per, unit in ((120, 1, "s"), (7200, 60, "m"), (172800, 3600, "h")):
        if seconds < limit:
            return f"{seconds / per:.0f}{unit}"
    return f"{seconds / 86400:.0f}d"


def _access(row: dict[str, Any]) -> str:
    """Who may connect, for the status table."""
    if row["protected"] is False:
        return "UNPROTECTED"
    if row["tls_only"] is False:
        return "PLAINTEXT"
    if row["authfile"] not in (None, "ok"):
        return f"authfile {row['authfile']}"
    if row["status"] != "active":
        return "nobody"
    return ",".join(row["client_addresses"] or []) or "-"


async def _live_views(
    settings: Settings, repository: Repository, server: NbdServer
) -> dict[str, ExportView]:
    """One sample of the live view, by export (empty, with a warning, when it fails)."""
    live = build_live(settings, repository, server, build_metrics(settings.node_id), keep=False)
    try:
        await live.sample()
    except (WorkerError, OSError) as exc:
        print(f"warning: could not sample the server's connections: {exc}", file=sys.stderr)
        return {}
    return live.view.views()


async def status(settings: Settings, args: argparse.Namespace) -> int:
    """Mappings with their live state; exit 1 when this node's nbd-server does not answer
    (the health check `nbd-client -l` was, without listing anything to anyone). Only this
    node's server can be probed: rows of other nodes (--node, --all-nodes) show the
    database's view, with known/servable unknown."""
    async with adapters(settings) as (repository, server):
        mappings = await repository.list_mappings(
            active_only=not args.all, node_id=args.node, all_nodes=args.all_nodes
        )
        answering = True
        try:
            await server.ping()
        except ServerUnavailable as exc:
            print(f"warning: nbd-server does not answer: {exc}", file=sys.stderr)
            answering = False
        local = [m for m in mappings if m.node_id == settings.node_id]
        probed_at = time.monotonic()
        # One NBD_OPT_GO per export says both whether the server knows it and whether it
        # opens; the server bounds how many are in flight (thousands of exports).
        states = await server.export_states(m.export_name for m in local) if answering else {}
        known = {name for name, state in states.items() if state != UNKNOWN}
        doors: dict[str, tuple[str, ...] | None] = {}
        for m in local:
            try:
                doors[m.export_name] = (
                    m.admitted(settings.client_addresses) if m.is_active else None
                )
            except ValueError:
                doors[m.export_name] = ()  # a corrupt column: shown as a wrong authfile
        # Active exports the server knows: what each opens as (None: it does not open).
        infos: dict[str, ExportInfo | None] = {}
        for m in local:
            if m.is_active and m.export_name in known:
                state = states[m.export_name]
                infos[m.export_name] = state if isinstance(state, ExportInfo) else None
        protected = await server.unprotected(
            {n: doors[n] or () for n, info in infos.items() if info is not None},
            opened_since=probed_at,  # each opened just now: only the canary is asked
        )
        # With TLS on: exports loaded before it keep serving plain clients until a restart.
        plaintext = (
            await server.plaintext_open([n for n, info in infos.items() if info is not None])
            if server.tls
            else {}
        )
        views = await _live_views(settings, repository, server) if answering else {}
        rows: list[dict[str, Any]] = []
        for m in mappings:
            here = m.node_id == settings.node_id
            probed = here and answering
            name = m.export_name
            info = infos.get(name)
            verdict = protected.get(name)
            rows.append(
                {
                    "node_id": m.node_id,
                    "export_name": name,
                    "vm_id": m.vm_id,
                    "disk_unit_number": m.disk_unit_number,
                    "vm_name": m.vm_name,
                    "status": m.status,
                    "device_path": m.device_path,
                    "device_present": device_present(m.device_path) if here else None,
                    "link_target": link_target(server.spec(name).link_path) if here else None,
                    # Known: the server has the name (loaded; released ones until a restart).
                    "known": name in known if probed else None,
                    "servable": info is not None if probed and m.is_active else None,
                    "size_bytes": info.size if info else None,
                    # As the server advertises them (NBD_OPT_GO): an export loaded before
                    # its snippet had the data-path options keeps its old ones until a
                    # restart.
                    "data_path": info.flags.as_dict() if info else None,
                    "client_addresses": list(doors[name] or []) if name in doors else None,
                    "authfile": server.authfile_state(name, doors[name]).value
                    if name in doors
                    else None,
                    # False: it admits everyone (loaded before it had an authfile).
                    "protected": None if verdict is None else not verdict,
                    # With NBD TLS on: False when plain clients can still open it.
                    "tls_only": None if plaintext.get(name) is None else not plaintext[name],
                    "flush_error": m.flush_error,
                    "updated_at": m.updated_at.isoformat() if m.updated_at else None,
                    # The live view (inspect-export's): null for rows not active here.
                    "live": live_state(views[name]).model_dump(mode="json")
                    if here and name in views
                    else None,
                }
            )
    if args.json:
        print(json.dumps(rows, indent=2))
    elif rows:
        for row in rows:
            row["offers"] = _offers(row["data_path"])
            row["access"] = _access(row)
            live = row["live"] or {}
            row["connections"] = len(live["connections"]) if live else "-"
            row["written"] = _bytes(live.get("bytes_written"))
            row["idle"] = _idle(live.get("idle_seconds"))
        columns = ["export_name", "status", "device_path", "device_present", "link_target"]
        columns += ["known", "servable", "offers", "access", "connections", "written", "idle"]
        if args.node or args.all_nodes:
            columns.insert(0, "node_id")
        print(_table(rows, columns))
    else:
        print("no mappings")
    return ExitCode.OK if answering else ExitCode.FAILURE
