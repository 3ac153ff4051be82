"""A private RabbitMQ cluster: `size` nodes on 127.0.0.1 with their own epmd and cookie,
started, killed and stopped by pid, suspending a quorum queue's member when asked."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from harness.clusters.state import START_TIMEOUT_S, free_ports, load_state, save_state
from harness.nbd import wait_for
from harness.processes import running, start_ticks, stop_group

#: The real RabbitMQ scripts: /usr/sbin/rabbitmq* switch to the rabbitmq user and take the
#: system node's cookie and environment.
RABBIT_SBIN = Path("/usr/lib/rabbitmq/bin")


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
    #: Lines added to every node's rabbitmq.conf (`consumer_timeout = 10000`).
    extra_conf: str = ""
    #: Every node's advanced.config, an Erlang term (settings rabbitmq.conf has no key
    #: for, such as `channel_tick_interval`); none when empty.
    advanced_config: str = ""

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
        self.epmd_port, *ports = free_ports(1 + 2 * self.size)
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
                f"{self.extra_conf}"
            )
            if self.advanced_config:
                (base / "advanced.config").write_text(self.advanced_config)
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
        save_state(self.root, "rabbitmq", asdict(self))

    @classmethod
    def load(cls, root: Path) -> RabbitCluster:
        data = load_state(root, "rabbitmq")
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


@contextlib.contextmanager
def rabbit_cluster(
    root: Path, size: int = 3, *, extra_conf: str = "", advanced_config: str = ""
) -> Iterator[RabbitCluster]:
    cluster = RabbitCluster(
        root / "rabbitmq", size, extra_conf=extra_conf, advanced_config=advanced_config
    )
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
