"""A private Galera cluster: `size` MariaDB nodes on 127.0.0.1 replicating with Galera 4,
and HAProxy from Debian in front of them as the one database address, each started,
killed and stopped by pid."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from harness.clusters.state import START_TIMEOUT_S, free_ports, load_state, save_state
from harness.mariadb import MariaDbInstance
from harness.nbd import wait_for
from harness.processes import running, start_ticks, stop_group

GALERA_PROVIDER = Path("/usr/lib/galera/libgalera_smm.so")
HAPROXY = Path("/usr/sbin/haproxy")
HAPROXY_SAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "haproxy" / "galera.cfg"
#: The user HAProxy's mysql-check logs in as (no password, no privileges, loopback only).
HAPROXY_CHECK_USER = "haproxy_check"


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
        ports = free_ports(4 * self.size + 1)
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
        save_state(self.root, "galera", asdict(self))

    @classmethod
    def load(cls, root: Path) -> GaleraCluster:
        data = load_state(root, "galera")
        nodes = [GaleraNode(**n) for n in data.pop("nodes")]
        data["root"] = Path(data["root"])
        return cls(**data, nodes=nodes)


@contextlib.contextmanager
def galera_cluster(root: Path, size: int = 3) -> Iterator[GaleraCluster]:
    cluster = GaleraCluster(root / "galera", size)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
