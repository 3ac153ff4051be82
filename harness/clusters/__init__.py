"""Private clusters on one machine, all on 127.0.0.1: three RabbitMQ nodes (quorum queues)
and three MariaDB nodes replicating with Galera 4, with HAProxy from Debian in front of
the Galera nodes as the one database address the worker is given.

Every process is started here, on free ports, with its own directories, and stopped (or
killed) by its pid: nothing touches the machine's own RabbitMQ, MariaDB or epmd. A
cluster's state (ports, pids) is kept in `<root>/cluster.json`, so the command line
(`python -m harness.clusters up|status|kill|restart|down`, see scripts/clusters.sh) can
manage one across invocations, and `down` is idempotent.

Over 400 lines: two clusters of the same shape (start, stop, kill and restart by pid, state
in cluster.json) and the command line that manages them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness.mariadb import MariaDbInstance
from harness.nbd import free_port, wait_for
from harness.processes import running, start_ticks, stop_group

#: The real RabbitMQ scripts: /usr/sbin/rabbitmq* switch to the rabbitmq user and take the
#: system node's cookie and environment.
RABBIT_SBIN = Path("/usr/lib/rabbitmq/bin")
GALERA_PROVIDER = Path("/usr/lib/galera/libgalera_smm.so")
HAPROXY = Path("/usr/sbin/haproxy")
HAPROXY_SAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "haproxy" / "galera.cfg"
#: Bounded start-up: each node (or, for RabbitMQ, the nodes that boot together) must be
#: up within this, or the start fails and everything started is stopped.
START_TIMEOUT_S = 120.0
#: The user HAProxy's mysql-check logs in as (no password, no privileges, loopback only).
HAPROXY_CHECK_USER = "haproxy_check"


#: Ports handed out by this process: two nodes of one cluster never get the same one.
_TAKEN: set[int] = set()


def _free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in _TAKEN:
            _TAKEN.add(port)
            ports.append(port)
    return ports


# --- RabbitMQ ---------------------------------------------------------------------------


@dataclass
class RabbitNode:
    index: int
    amqp_port: int
    dist_port: int
    #: The node's process group: the rabbitmq-server script, which forks the Erlang VM.
    pid: int = 0
    started: int = 0

    @property
    def name(self) -> str:
        return f"rmq{self.index}@localhost"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"


@dataclass
class RabbitCluster:
    """`size` RabbitMQ nodes sharing a private epmd and cookie, clustered by RabbitMQ's
    classic-config peer discovery (each later node joins the first one at its first boot)."""

    root: Path
    size: int = 3
    epmd_port: int = 0
    epmd_pid: int = 0
    epmd_started: int = 0
    nodes: list[RabbitNode] = field(default_factory=list)

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def node(self, index: int) -> RabbitNode:
        return self.nodes[index - 1]

    def _env(self, node: RabbitNode) -> dict[str, str]:
        base = self.root / node.name.split("@")[0]
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "LANG": "C.UTF-8",
            # The cookie is read from $HOME/.erlang.cookie, by the nodes and by rabbitmqctl.
            "HOME": str(self.root),
            "RABBITMQ_CONF_ENV_FILE": str(self.root / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins"),
            "RABBITMQ_NODENAME": node.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(node.amqp_port),
            "RABBITMQ_DIST_PORT": str(node.dist_port),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_PID_FILE": str(base / "rabbit.pid"),
            # Nothing of the machine's own broker: no advanced.config, no conf.d.
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
            "RABBITMQ_CONFIG_FILES": str(base / "conf.d"),
            "ERL_CRASH_DUMP": str(base / "erl_crash.dump"),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            # Erlang distribution (the nodes' and the CLI's) on loopback only.
            "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        cookie = self.root / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(20))
        cookie.chmod(0o400)
        (self.root / "rabbitmq-env.conf").write_text("")
        (self.root / "enabled_plugins").write_text("[].\n")
        self.epmd_port, *ports = _free_ports(1 + 2 * self.size)
        epmd = subprocess.Popen(
            ["epmd", "-port", str(self.epmd_port), "-address", "127.0.0.1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        self.epmd_pid, self.epmd_started = epmd.pid, start_ticks(epmd.pid) or 0
        self.save()
        # Up before any node: a node finding no epmd would start one of its own (-daemon),
        # which nobody here would know the pid of.
        wait_for(lambda: _accepts(self.epmd_port), 10, "epmd", 0.05)
        self.nodes = [
            RabbitNode(i, ports[2 * i - 2], ports[2 * i - 1]) for i in range(1, self.size + 1)
        ]
        peers = "".join(
            f"cluster_formation.classic_config.nodes.{n.index} = {n.name}\n" for n in self.nodes
        )
        for node in self.nodes:
            base = self.root / node.name.split("@")[0]
            base.mkdir(exist_ok=True)
            (base / "rabbitmq.conf").write_text(
                f"listeners.tcp.default = 127.0.0.1:{node.amqp_port}\n"
                "cluster_formation.peer_discovery_backend = classic_config\n"
                f"{peers}"
                "log.console = false\n"
                "log.file.level = info\n"
            )
        self.save()
        # The first node alone forms the cluster; the others join it as they boot.
        self.start_node(1)
        scripts = [(node, self._spawn(node)) for node in self.nodes[1:]]
        for node, script in scripts:
            self._await_node(node, script)
        wait_for(lambda: len(self.running_nodes()) == self.size, 60, "all nodes clustered", 0.5)

    def _spawn(self, node: RabbitNode) -> subprocess.Popen[bytes]:
        base = self.root / node.name.split("@")[0]
        log = (base / "console.log").open("ab")
        script = subprocess.Popen(
            [str(RABBIT_SBIN / "rabbitmq-server")],
            env=self._env(node), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        log.close()
        # Recorded at once: a node that then fails to come up is still stopped by `stop`.
        node.pid, node.started = script.pid, start_ticks(script.pid) or 0
        self.save()
        return script

    def _await_node(self, node: RabbitNode, script: subprocess.Popen[bytes]) -> None:
        def answers() -> bool:
            if script.poll() is not None:
                raise RuntimeError(f"RabbitMQ node {node.name} exited: {self._log_tail(node)}")
            return amqp_answers(node.amqp_port)

        wait_for(answers, START_TIMEOUT_S, f"RabbitMQ node {node.name}", 0.2)

    def _log_tail(self, node: RabbitNode) -> str:
        base = self.root / node.name.split("@")[0]
        with contextlib.suppress(OSError):
            return (base / "console.log").read_text(errors="replace")[-2000:]
        return ""

    def start_node(self, index: int) -> None:
        node = self.node(index)
        if running(node.pid, node.started):
            return
        self._await_node(node, self._spawn(node))

    def kill_node(self, index: int) -> None:
        """SIGKILL, as a crash or a power cut would."""
        node = self.node(index)
        stop_group(node.pid, node.started, signal.SIGKILL)
        node.pid = 0
        self.save()

    def ctl(self, index: int, *args: str, timeout_s: float = 60) -> str:
        """rabbitmqctl against node `index` (stop_app, start_app, list_queues ...)."""
        node = self.node(index)
        done = subprocess.run(
            [str(RABBIT_SBIN / "rabbitmqctl"), "-n", node.name, "-q", *args],
            env=self._env(node), capture_output=True, text=True, timeout=timeout_s,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr.strip()[-500:]}")
        return done.stdout

    def running_nodes(self, via: int | None = None) -> list[str]:
        for node in self.nodes if via is None else [self.node(via)]:
            if not (running(node.pid, node.started)):
                continue
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired, ValueError):
                status = json.loads(self.ctl(node.index, "cluster_status", "--formatter", "json"))
                return sorted(status["running_nodes"])
        return []

    def queue_leader(self, queue: str) -> tuple[int, list[int]]:
        """The index of the node leading quorum queue `queue`, and its members' indexes,
        as the first running node that can tell sees them (not during an election)."""
        index = {n.name: n.index for n in self.nodes}
        for node in self.nodes:
            if not running(node.pid, node.started):
                continue
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired, ValueError):
                out = self.ctl(
                    node.index, "list_queues", "name", "leader", "members", "--formatter", "json"
                )
                for row in json.loads(out):
                    if row["name"] == queue and row.get("leader") in index:
                        return index[row["leader"]], sorted(index[m] for m in row["members"])
        raise LookupError(f"no running node knows the leader of {queue}")

    def pause_member(self, index: int, queue: str, *, paused: bool) -> None:
        """Suspends (or resumes) quorum queue `queue`'s member on node `index`: a suspended
        member casts no vote, so once the leader is killed no new leader can be elected
        until it is resumed. A leader election held open for as long as a test needs,
        instead of the ~0.2 s a healthy cluster takes (`sys:suspend` of the member's Ra
        server, a gen_statem; nothing else on the node stops)."""
        if not all(c.isalnum() or c in "._-" for c in queue):
            raise ValueError(f"queue name {queue!r} is not one this harness quotes")
        call = "suspend" if paused else "resume"
        self.ctl(
            index,
            "eval",
            f'{{ok, Q}} = rabbit_amqqueue:lookup(rabbit_misc:r(<<"/">>, queue, <<"{queue}">>)),'
            f" {{Name, _}} = amqqueue:get_pid(Q), sys:{call}(whereis(Name)), ok.",
        )

    def stop(self) -> None:
        for node in self.nodes:
            stop_group(node.pid, node.started)
            node.pid = 0
        stop_group(self.epmd_pid, self.epmd_started)
        self.epmd_pid = 0
        self.save()

    def status(self) -> dict[str, object]:
        return {
            "epmd": {"port": self.epmd_port, "pid": self.epmd_pid},
            "running_nodes": self.running_nodes(),
            "nodes": [
                {
                    "name": n.name,
                    "url": n.url,
                    "pid": n.pid,
                    "up": bool(running(n.pid, n.started)),
                }
                for n in self.nodes
            ],
        }

    def save(self) -> None:
        _save(self.root, "rabbitmq", asdict(self))

    @classmethod
    def load(cls, root: Path) -> RabbitCluster:
        data = _load(root, "rabbitmq")
        nodes = [RabbitNode(**n) for n in data.pop("nodes")]
        data["root"] = Path(data["root"])
        return cls(**data, nodes=nodes)


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def amqp_answers(port: int) -> bool:
    """Whether an AMQP listener answers the protocol header with Connection.Start."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"AMQP\x00\x00\x09\x01")
            sock.settimeout(2)
            return sock.recv(1) == b"\x01"  # a METHOD frame
    except OSError:
        return False


# --- Galera -----------------------------------------------------------------------------


@dataclass
class GaleraNode:
    index: int
    port: int
    gcomm_port: int
    ist_port: int
    sst_port: int
    pid: int = 0
    started: int = 0


@dataclass
class GaleraCluster:
    """`size` MariaDB nodes replicating with Galera 4 (rsync state transfer), bootstrapped
    with --wsrep-new-cluster on the first, plus HAProxy sending every connection to one
    node at a time (the others are backups): one writer, so no certification conflicts
    between the worker's own connections, and failover within about a second."""

    root: Path
    size: int = 3
    name: str = "nbdtest"
    nodes: list[GaleraNode] = field(default_factory=list)
    proxy_port: int = 0
    proxy_pid: int = 0
    proxy_started: int = 0

    def node(self, index: int) -> GaleraNode:
        return self.nodes[index - 1]

    def url(self, index: int | None = None, database: str = "") -> str:
        """The database URL through HAProxy, or straight to node `index`."""
        port = self.proxy_port if index is None else self.node(index).port
        if not port:  # never the machine's own server on the default port
            raise RuntimeError("the cluster has not been started")
        return f"mysql://root@127.0.0.1:{port}/{database}".rstrip("/")

    def _instance(self, node: GaleraNode) -> MariaDbInstance:
        peers = ",".join(f"127.0.0.1:{n.gcomm_port}" for n in self.nodes)
        provider = (
            f"gmcast.listen_addr=tcp://127.0.0.1:{node.gcomm_port};"
            f"ist.recv_addr=127.0.0.1:{node.ist_port}"
        )
        return MariaDbInstance(
            self.root / f"galera{node.index}",
            port=node.port,
            pid=node.pid,
            user="mysql",
            extra_args=[
                "--wsrep-on=ON",
                f"--wsrep-provider={GALERA_PROVIDER}",
                f"--wsrep-cluster-name={self.name}",
                f"--wsrep-cluster-address=gcomm://{peers}",
                f"--wsrep-node-name=galera{node.index}",
                f"--wsrep-node-address=127.0.0.1:{node.gcomm_port}",
                f"--wsrep-provider-options={provider}",
                f"--wsrep-sst-receive-address=127.0.0.1:{node.sst_port}",
                "--wsrep-sst-method=rsync",
                "--binlog-format=ROW",
                "--innodb-autoinc-lock-mode=2",
                # Galera's rule, enforced: a table without a primary key is refused.
                "--innodb-force-primary-key=ON",
            ],
        )

    def start(self) -> None:
        # The nodes run as mysql: every directory above theirs must let it through.
        self.root.mkdir(parents=True, exist_ok=True)
        for path in (self.root, *self.root.parents):
            if not path.stat().st_mode & 0o001:
                raise RuntimeError(f"{path} is not searchable by the mysql user: use another root")
        ports = _free_ports(4 * self.size + 1)
        self.proxy_port = ports.pop()
        self.nodes = [GaleraNode(i, *ports[4 * i - 4 : 4 * i]) for i in range(1, self.size + 1)]
        self.save()
        self.start_node(1, bootstrap=True)
        first = self._instance(self.node(1))
        first.sql(f"CREATE USER IF NOT EXISTS '{HAPROXY_CHECK_USER}'@'127.0.0.1'")
        first.sql("CREATE USER IF NOT EXISTS 'root'@'127.0.0.1'")
        first.sql("GRANT ALL ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION")
        for node in self.nodes[1:]:
            self.start_node(node.index)
        self.start_proxy()

    def start_node(self, index: int, *, bootstrap: bool = False) -> None:
        node = self.node(index)
        if running(node.pid, node.started):
            return
        instance = self._instance(node)
        try:
            instance.start(bootstrap=bootstrap)
        finally:  # also when it did not come up: `stop` must find it
            node.pid, node.started = instance.pid, start_ticks(instance.pid) or 0
            self.save()
        wait_for(lambda: self._synced(node), START_TIMEOUT_S, f"galera{index} synced", 0.2)

    def _synced(self, node: GaleraNode) -> bool:
        state = self.wsrep_status(node.index)
        return (
            state.get("wsrep_local_state_comment") == "Synced"
            and state.get("wsrep_cluster_status") == "Primary"
        )

    def wsrep_status(self, index: int) -> dict[str, str]:
        node = self.node(index)
        if not (running(node.pid, node.started)):
            return {}
        done = self._instance(node).sql("SHOW GLOBAL STATUS LIKE 'wsrep_%'", check=False)
        rows = (line.split("\t", 1) for line in done.stdout.splitlines()[1:])
        return {k: v for k, v in (r for r in rows if len(r) == 2)}

    def kill_node(self, index: int) -> None:
        node = self.node(index)
        stop_group(node.pid, node.started, signal.SIGKILL)
        node.pid = 0
        self.save()

    def stop_node(self, index: int) -> None:
        node = self.node(index)
        stop_group(node.pid, node.started)
        node.pid = 0
        self.save()

    def start_proxy(self) -> None:
        if running(self.proxy_pid, self.proxy_started):
            return
        # The sample operators copy (deploy/haproxy/galera.cfg), with this cluster's ports.
        config_text = HAPROXY_SAMPLE.read_text().replace(
            "bind 127.0.0.1:3307", f"bind 127.0.0.1:{self.proxy_port}"
        )
        for n in self.nodes:
            config_text = config_text.replace(
                f"galera{n.index}.example:3306", f"127.0.0.1:{n.port}"
            )
        config = self.root / "haproxy.cfg"
        config.write_text(config_text)
        check = subprocess.run(
            [str(HAPROXY), "-c", "-q", "-f", str(config)], capture_output=True, text=True
        )
        if check.returncode != 0:
            raise RuntimeError(f"haproxy -c: {check.stderr.strip()}")
        log = (self.root / "haproxy.log").open("ab")
        proc = subprocess.Popen(
            [str(HAPROXY), "-db", "-f", str(config)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        log.close()
        self.proxy_pid, self.proxy_started = proc.pid, start_ticks(proc.pid) or 0
        self.save()
        wait_for(lambda: self._proxy_serves(), 30, "HAProxy in front of Galera", 0.1)

    def _proxy_serves(self) -> bool:
        done = subprocess.run(
            ["mariadb", "-h127.0.0.1", f"-P{self.proxy_port}", "-uroot", "-e", "SELECT 1"],
            capture_output=True, timeout=10,
        )  # fmt: skip
        return done.returncode == 0

    def proxy_backend(self) -> int:
        """The index of the node HAProxy sends new connections to (by @@wsrep_node_name);
        0 when none answers through it now."""
        done = subprocess.run(
            ["mariadb", "-h127.0.0.1", f"-P{self.proxy_port}", "-uroot", "-N", "-e",
             "SELECT @@wsrep_node_name"],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        name = done.stdout.strip()
        return int(name.removeprefix("galera")) if done.returncode == 0 and name else 0

    def stop(self) -> None:
        stop_group(self.proxy_pid, self.proxy_started)
        self.proxy_pid = 0
        # The last node down is the most advanced one: stopping in reverse keeps node 1,
        # which `start` bootstraps, the one with everything.
        for node in reversed(self.nodes):
            stop_group(node.pid, node.started)
            node.pid = 0
        self.save()

    def status(self) -> dict[str, object]:
        return {
            "proxy": {"url": self.url(), "pid": self.proxy_pid},
            "nodes": [
                {
                    "name": f"galera{n.index}",
                    "url": self.url(n.index),
                    "pid": n.pid,
                    "state": self.wsrep_status(n.index).get("wsrep_local_state_comment", "down"),
                }
                for n in self.nodes
            ],
        }

    def save(self) -> None:
        _save(self.root, "galera", asdict(self))

    @classmethod
    def load(cls, root: Path) -> GaleraCluster:
        data = _load(root, "galera")
        nodes = [GaleraNode(**n) for n in data.pop("nodes")]
        data["root"] = Path(data["root"])
        return cls(**data, nodes=nodes)


# --- state file and context managers ----------------------------------------------------


def _save(root: Path, key: str, value: dict[str, object]) -> None:
    path = root.parent / "cluster.json"  # root is <cluster root>/rabbitmq or /galera
    state = json.loads(path.read_text()) if path.exists() else {}
    state[key] = json.loads(json.dumps(value, default=str))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(path)


def _load(root: Path, key: str) -> dict[str, Any]:
    state = json.loads((root / "cluster.json").read_text())
    if key not in state:
        raise LookupError(f"no {key} cluster in {root}")
    data: dict[str, Any] = state[key]
    return data


@contextlib.contextmanager
def rabbit_cluster(root: Path, size: int = 3) -> Iterator[RabbitCluster]:
    cluster = RabbitCluster(root / "rabbitmq", size)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@contextlib.contextmanager
def galera_cluster(root: Path, size: int = 3) -> Iterator[GaleraCluster]:
    cluster = GaleraCluster(root / "galera", size)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


# --- command line -----------------------------------------------------------------------


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
