"""The clusters' command line: `python -m harness.clusters up|status|kill|restart|down`
(scripts/clusters.sh), which manages one pair of clusters across invocations through
the state they keep."""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from pathlib import Path

from harness.clusters.galera import GaleraCluster
from harness.clusters.rabbitmq import RabbitCluster


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/clusters.sh", description="Private RabbitMQ and Galera clusters on 127.0.0.1."
    )
    parser.add_argument("--root", type=Path, default=Path("/tmp/nbd-export-worker-clusters"))
    sub = parser.add_subparsers(dest="command", required=True)
    # Three nodes each: the HAProxy sample names three Galera servers.
    sub.add_parser("up", help="start both clusters (3 nodes each) and HAProxy")
    sub.add_parser("status", help="nodes, pids, URLs and health")
    for verb in ("kill", "restart"):
        p = sub.add_parser(verb, help=f"{verb} one node (kill: SIGKILL)")
        p.add_argument("cluster", choices=("rabbitmq", "galera"))
        p.add_argument("index", type=int)
    sub.add_parser("down", help="stop everything by pid (idempotent) and delete the root")
    args = parser.parse_args(argv)
    root: Path = args.root

    if args.command == "up":
        if (root / "cluster.json").exists():
            parser.error(f"{root} holds a cluster already: `down` it first")
        root.mkdir(parents=True)
        started = time.monotonic()
        try:
            RabbitCluster(root / "rabbitmq").start()
            GaleraCluster(root / "galera").start()
        except BaseException:
            # Everything stopped, the logs kept for the reason: `down` deletes them.
            for loader in (GaleraCluster.load, RabbitCluster.load):
                with contextlib.suppress(LookupError, OSError):
                    loader(root).stop()
            print(f"up failed: logs in {root}; `down` removes them", file=sys.stderr)
            raise
        print(f"up in {time.monotonic() - started:.0f} s")
        args.command = "status"
    if args.command == "down":
        if (root / "cluster.json").exists():
            for loader in (GaleraCluster.load, RabbitCluster.load):
                with contextlib.suppress(LookupError):
                    loader(root).stop()
        shutil.rmtree(root, ignore_errors=True)
        return 0
    rabbit, galera = RabbitCluster.load(root), GaleraCluster.load(root)
    if args.command in ("kill", "restart"):
        cluster = rabbit if args.cluster == "rabbitmq" else galera
        if args.command == "kill":
            cluster.kill_node(args.index)
        else:
            cluster.kill_node(args.index)
            cluster.start_node(args.index)
    print(json.dumps({"rabbitmq": rabbit.status(), "galera": galera.status()}, indent=2))
    return 0
