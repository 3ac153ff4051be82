"""The image built and its compose stack run for real, and what operators do to it.

One private Docker daemon (tests/containers.py), the project's image built from this
checkout, and docker-compose.yml run as an operator runs it, on the host network against
this machine's RabbitMQ and MariaDB, with its own database, queues, ports and disks. The
tests run in file order on one stack; each leaves it healthy for the next.

Over 400 lines (budget 480) as one capability's tests, with the helpers they share.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.error import HTTPError
from urllib.request import urlopen

import pytest
from pydantic import AnyUrl

from harness.nbd import NbdConnection, free_port
from harness.sql import execute_sql
from tests.conftest import AMQP_URL, MYSQL_URL, clean_environ, run_worker_cli, unique
from tests.containers import IMAGE, ROOT, ComposeStack, DockerDaemon, build_image, running_daemon

pytestmark = pytest.mark.timeout(1800)

UID = 10809  # the image's nbdexport user
DISK_SIZE = 64 * 1024 * 1024
NODE = "compose-node"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerDaemon]:
    with running_daemon(tmp_path_factory.mktemp("dockerd")) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def image(daemon: DockerDaemon) -> str:
    seconds = build_image(daemon)
    size = int(daemon.inspect(IMAGE)["Size"]) / 1e6
    print(f"\nimage {IMAGE} built in {seconds:.0f} s, {size:.0f} MB")
    return IMAGE


@dataclass
class Stack:
    compose: ComposeStack
    dir: Path
    database: str
    request_queue: str
    nbd_port: int
    metrics_port: int
    disks: Path

    @property
    def database_url(self) -> AnyUrl:
        return AnyUrl(f"{MYSQL_URL}/{self.database}")

    def host_env(self) -> dict[str, str]:
        """The worker CLI on the host, as a scheduler's stand-in publishing jobs."""
        return clean_environ(
            EXPORT_WORKER_AMQP_URL=AMQP_URL,
            EXPORT_WORKER_REQUEST_QUEUE=self.request_queue,
            EXPORT_WORKER_STATE_DIR=str(self.dir / "host-state"),
        )

    def request(self, vm_id: str, device: str, timeout_s: float = 60) -> dict[str, Any]:
        done = run_worker_cli(
            "request",
            "--vm-id",
            vm_id,
            "--vm-name",
            "compose-vm",
            "--device",
            device,
            "--timeout",
            str(timeout_s),
            env=self.host_env(),
            timeout_s=timeout_s + 30,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        reply: dict[str, Any] = json.loads(done.stdout)
        return reply

    def ready(self) -> tuple[int, dict[str, Any]]:
        try:
            with urlopen(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=10) as r:
                return r.status, json.loads(r.read())
        except HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def wait_ready(self, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                status, body = self.ready()
            except OSError as exc:
                status, body = 0, {"error": str(exc)}
            if status == 200:
                return
            assert time.monotonic() < deadline, f"/readyz never ready: {status} {body}"
            time.sleep(1)

    def make_disk(self, name: str) -> str:
        """A sparse file in the disks directory, pre-filled with other data."""
        path = self.disks / name
        with path.open("wb") as f:
            f.truncate(DISK_SIZE)
            f.write(b"\xa5" * (1 << 20))
        os.chown(path, UID, UID)
        return f"/srv/disks/{name}"

    async def rows(self, vm_id: str) -> list[tuple[Any, ...]]:
        return await execute_sql(
            self.database_url,
            "SELECT node_id, status FROM vm_export_mappings WHERE vm_id = %s",
            [vm_id],
        )


def _config(nbd_port: int) -> str:
    """The shipped base config, on a free port."""
    text = (ROOT / "deploy/compose/nbd-server.conf").read_text()
    assert "port = 10809" in text
    return text.replace("port = 10809", f"port = {nbd_port}")


def _env_file(stack_dir: Path, **overrides: str) -> Path:
    """The shipped env file, with this test's database, queues and ports."""
    lines = (ROOT / "deploy/compose/worker.env").read_text().splitlines()
    settings = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    settings.update(overrides)
    path = stack_dir / "worker.env"
    path.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    return path


@pytest.fixture(scope="module")
def stack(
    daemon: DockerDaemon, image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    stack_dir = tmp_path_factory.mktemp("stack")
    disks = stack_dir / "disks"
    disks.mkdir()
    os.chown(disks, UID, UID)
    nbd_port, metrics_port = free_port(), free_port()
    while metrics_port == nbd_port:
        metrics_port = free_port()
    (stack_dir / "nbd-server.conf").write_text(_config(nbd_port))
    database = unique("nbdcompose")
    request_queue = unique("test.compose.prepare-export")
    env_file = _env_file(
        stack_dir,
        EXPORT_WORKER_DATABASE_URL=f"{MYSQL_URL}/{database}",
        EXPORT_WORKER_AMQP_URL=AMQP_URL,
        EXPORT_WORKER_REQUEST_QUEUE=request_queue,
        EXPORT_WORKER_REPLY_QUEUE=unique("test.compose.export-ready"),
        EXPORT_WORKER_EXCHANGE=unique("test.compose.exports"),
        EXPORT_WORKER_NBD_PORT=str(nbd_port),
        # Not the image's 9108: the healthcheck must follow the setting.
        EXPORT_WORKER_METRICS_PORT=str(metrics_port),
        EXPORT_WORKER_METRICS_HOST="127.0.0.1",
        EXPORT_WORKER_HOUSEKEEPING_INTERVAL_S="2",
    )
    compose = ComposeStack(
        daemon,
        unique("nbdx").replace("_", ""),
        {
            "EXPORT_WORKER_NODE_ID": NODE,
            "EXPORT_WORKER_NBD_ADVERTISE_HOST": "127.0.0.1",
            "NBD_STACK_IMAGE": image,
            "NBD_STACK_SERVER_IMAGE": image,
            "NBD_STACK_ENV_FILE": str(env_file),
            "NBD_STACK_SERVER_CONFIG": str(stack_dir / "nbd-server.conf"),
            "NBD_STACK_DISKS": str(disks),
        },
    )
    stack = Stack(compose, stack_dir, database, request_queue, nbd_port, metrics_port, disks)
    try:
        compose.compose("up", "-d")
        compose.wait_healthy("worker")
        stack.wait_ready()
        yield stack
    finally:
        print("\ncompose calls: " + "; ".join(compose.calls))
        for service in ("nbd-server", "worker"):
            print("\n".join(compose.logs(service).splitlines()[-30:]))
        compose.compose("down", "-v", "--timeout", "20", check=False)
        asyncio.run(execute_sql(AnyUrl(MYSQL_URL), f"DROP DATABASE IF EXISTS `{database}`"))


@pytest.fixture(scope="module")
def export(stack: Stack) -> dict[str, Any]:
    """One VM disk prepared through the stack (created), for the scenarios."""
    reply = stack.request(str(uuid.uuid4()), stack.make_disk("vm-disk0"))
    assert (reply["status"], reply["action"]) == ("ready", "created"), reply
    return reply


def _served(reply: dict[str, Any]) -> bool:
    """The export opens for a copy tool where the reply says."""
    done = subprocess.run(
        ["nbdinfo", "--can", "flush", _uri(reply)], capture_output=True, timeout=30
    )
    return done.returncode == 0


def _uri(reply: dict[str, Any]) -> str:
    return f"nbd://{reply['nbd_host']}:{reply['nbd_port']}/{reply['export_name']}"


def _started_at(stack: Stack, service: str) -> str:
    return str(stack.compose.state(service)["StartedAt"])


def _assert_reused(stack: Stack, export: dict[str, Any]) -> None:
    reply = stack.request(export["vm_id"], export["device_path"])
    assert (reply["status"], reply["action"], reply["reused"]) == ("ready", "reused", True)
    assert reply["export_name"] == export["export_name"]
    assert _served(reply)


# --- the image ----------------------------------------------------------------------------


def test_image_runs_unprivileged_with_the_projects_nbd_server(
    daemon: DockerDaemon, image: str
) -> None:
    config = daemon.inspect(image)["Config"]
    assert config["User"] == "nbdexport"
    assert config["Healthcheck"]["Test"] == ["CMD", "nbd-export-worker", "healthcheck"]
    # The server the image runs passes the data-path self-test: not apt's 3.26.1, whose
    # WRITE_ZEROES leaves all but the first 64 MiB as they were.
    done = daemon.docker(
        "run",
        "--rm",
        "--network=host",
        image,
        "self-test",
        "--binary",
        "/usr/local/sbin/nbd-server",
    )
    assert "passed the data-path self-test" in done.stdout + done.stderr
    assert daemon.docker("run", "--rm", "--entrypoint", "id", image, "-u").stdout.strip() == str(
        UID
    )
    apt = daemon.docker(
        "run", "--rm", "--entrypoint", "dpkg", image, "-s", "nbd-server", check=False
    )
    assert apt.returncode != 0, "apt's nbd-server is installed in the image"


def test_compose_refuses_to_start_without_node_id_or_advertise_host(stack: Stack) -> None:
    for missing in ("EXPORT_WORKER_NODE_ID", "EXPORT_WORKER_NBD_ADVERTISE_HOST"):
        variables = {k: v for k, v in stack.compose.variables.items() if k != missing}
        done = stack.compose.compose("config", "-q", check=False, env=variables)
        assert done.returncode != 0
        assert f"set {missing}" in done.stderr, done.stderr


# --- the stack ----------------------------------------------------------------------------


async def test_job_created_then_reused_and_a_copy_through_the_container_export(
    stack: Stack, export: dict[str, Any], tmp_path: Path
) -> None:
    # Replies advertise what the operator set, not a name of the compose network.
    assert (export["nbd_host"], export["nbd_port"]) == ("127.0.0.1", stack.nbd_port)
    assert export["node_id"] == NODE
    image = tmp_path / "vm-disk0.img"
    with image.open("wb") as f:
        f.truncate(DISK_SIZE)
        f.write(os.urandom(4 << 20))
        f.seek(40 << 20)
        f.write(os.urandom(1 << 20))
    subprocess.run(["nbdcopy", "--flush", str(image), _uri(export)], check=True, timeout=120)
    target = stack.disks / Path(export["device_path"]).name
    assert subprocess.run(["cmp", str(image), str(target)]).returncode == 0
    _assert_reused(stack, export)

    status = json.loads(
        stack.compose.exec("worker", "nbd-export-worker", "status", "--json").stdout
    )
    (row,) = [m for m in status if m["export_name"] == export["export_name"]]
    assert (row["status"], row["known"], row["servable"], row["protected"]) == (
        "active",
        True,
        True,
        True,
    )
    check = stack.compose.exec("worker", "nbd-export-worker", "check", check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"ok   node id {NODE} (from the EXPORT_WORKER_NODE_ID)" in check.stdout
    code, body = stack.ready()
    assert code == 200, body
    # The HEALTHCHECK follows EXPORT_WORKER_METRICS_PORT (not the image's 9108).
    assert stack.compose.health("worker") == "healthy"
    assert stack.compose.health("nbd-server") == "healthy"
    rows = await stack.rows(export["vm_id"])
    assert rows == [(NODE, "active")]


def test_processes_run_as_the_unprivileged_user_in_the_host_pid_namespace(stack: Stack) -> None:
    pid = int(stack.compose.exec("worker", "cat", "/run/nbd-server/nbd-server.pid").stdout)
    status = Path(f"/proc/{pid}/status").read_text()
    assert re.search(rf"^Uid:\s+{UID}\s", status, re.M), status
    assert os.path.basename(os.readlink(f"/proc/{pid}/exe")) == "nbd-server"
    worker_pid = int(stack.compose.state("worker")["Pid"])
    assert re.search(rf"^Uid:\s+{UID}\s", Path(f"/proc/{worker_pid}/status").read_text(), re.M)


def _wait_down(stack: Stack) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        code, body = stack.ready()
        if code == 503 and body["checks"]["nbd_server"] != "ok":
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.5)


def _assert_back_with_the_same_worker(
    stack: Stack, export: dict[str, Any], worker_started_at: str
) -> None:
    """nbd-server healthy again, the worker ready, never restarted, and reusing."""
    stack.compose.wait_healthy("nbd-server")
    stack.wait_ready()
    _assert_reused(stack, export)
    assert _started_at(stack, "worker") == worker_started_at
    assert stack.compose.state("worker")["Running"]


def test_worker_survives_nbd_server_stop_and_start(stack: Stack, export: dict[str, Any]) -> None:
    started = _started_at(stack, "worker")
    stack.compose.compose("stop", "nbd-server")
    body = _wait_down(stack)
    assert "not running" in body["checks"]["nbd_server"]
    assert stack.compose.state("worker")["Running"]
    stack.compose.compose("start", "nbd-server")
    _assert_back_with_the_same_worker(stack, export, started)


def test_worker_survives_nbd_server_restart(stack: Stack, export: dict[str, Any]) -> None:
    started = _started_at(stack, "worker")
    old_pid = stack.compose.exec("worker", "cat", "/run/nbd-server/nbd-server.pid").stdout
    stack.compose.compose("restart", "nbd-server")
    _assert_back_with_the_same_worker(stack, export, started)
    assert stack.compose.exec("worker", "cat", "/run/nbd-server/nbd-server.pid").stdout != old_pid


def test_nbd_server_recreated_then_up_again(stack: Stack, export: dict[str, Any]) -> None:
    started = _started_at(stack, "worker")
    old = stack.compose.container("nbd-server")
    stack.compose.compose("up", "-d", "--force-recreate", "--no-deps", "nbd-server")
    assert stack.compose.container("nbd-server") != old
    # What operators run after any change: it must not fail, nor leave the worker dead.
    stack.compose.compose("up", "-d")
    _assert_back_with_the_same_worker(stack, export, started)


async def test_worker_upgraded_keeps_its_node_id_its_rows_and_the_copy_tools_connection(
    stack: Stack, daemon: DockerDaemon, export: dict[str, Any], tmp_path: Path
) -> None:
    """An upgrade as docs/operations.md gives it: a new worker image, NBD_STACK_IMAGE set to it, `up
    -d`. The worker is recreated; nbd-server, and the copy in flight, are not touched."""
    (tmp_path / "Dockerfile").write_text(f"FROM {IMAGE}\nLABEL upgrade=next\n")
    daemon.docker("build", "-t", f"{IMAGE}-next", str(tmp_path))
    old_worker, server = stack.compose.container("worker"), stack.compose.container("nbd-server")
    with NbdConnection(stack.nbd_port, export["export_name"]) as held:
        before = held.read(0, 65536)
        stack.compose.variables = {**stack.compose.variables, "NBD_STACK_IMAGE": f"{IMAGE}-next"}
        stack.compose.compose("up", "-d")
        assert stack.compose.container("worker") != old_worker
        assert stack.compose.container("nbd-server") == server
        stack.compose.wait_healthy("worker")
        stack.wait_ready()
        assert held.read(0, 65536) == before
    worker_image = daemon.inspect(stack.compose.container("worker"))["Config"]["Image"]
    assert worker_image == f"{IMAGE}-next"
    _assert_reused(stack, export)
    # The same node: no orphan, no second active row for the disk.
    assert await stack.rows(export["vm_id"]) == [(NODE, "active")]
    status = json.loads(
        stack.compose.exec("worker", "nbd-export-worker", "status", "--json").stdout
    )
    assert [m["export_name"] for m in status] == [export["export_name"]]


async def test_worker_recreated_keeps_its_node_id_and_rows(
    stack: Stack, export: dict[str, Any]
) -> None:
    old = stack.compose.container("worker")
    stack.compose.compose("up", "-d", "--force-recreate", "--no-deps", "worker")
    assert stack.compose.container("worker") != old
    stack.compose.wait_healthy("worker")
    stack.wait_ready()
    _assert_reused(stack, export)
    assert await stack.rows(export["vm_id"]) == [(NODE, "active")]


async def test_stack_comes_back_after_a_daemon_restart(
    stack: Stack, daemon: DockerDaemon, export: dict[str, Any]
) -> None:
    for service in ("nbd-server", "worker"):
        policy = daemon.inspect(stack.compose.container(service))["HostConfig"]["RestartPolicy"]
        assert policy["Name"] == "unless-stopped", (service, policy)
    daemon.restart()  # a reboot, as far as containers can tell
    stack.compose.wait_healthy("nbd-server")
    stack.compose.wait_healthy("worker")
    stack.wait_ready()
    _assert_reused(stack, export)
    assert await stack.rows(export["vm_id"]) == [(NODE, "active")]


# --- the node id without the setting ------------------------------------------------------


def test_image_keeps_the_node_id_its_first_start_chose(stack: Stack, daemon: DockerDaemon) -> None:
    """Without EXPORT_WORKER_NODE_ID (docker run, no compose), the first start writes its
    host name (a container id) to the state volume; a recreated container keeps it, and
    `check` says to set one."""
    volume = unique("nbdxstate")
    daemon.docker("volume", "create", volume)
    run = ["run", "--rm", "--network=host", "-v", f"{volume}:/var/lib/nbd-export-worker"]
    # A database nobody answers on: `run` stops at once, after settling its node id.
    env = ["-e", f"EXPORT_WORKER_DATABASE_URL=mysql://root@127.0.0.1:{free_port()}/x"]
    env += ["-e", "EXPORT_WORKER_DB_CONNECT_TIMEOUT_S=1", "-e", "EXPORT_WORKER_METRICS_PORT=0"]
    try:
        first = daemon.docker(*run, "--hostname", "0123456789ab", *env, IMAGE, "run", check=False)
        assert first.returncode != 0, first.stdout + first.stderr
        ids = set()
        for hostname in ("fedcba987654", "a1b2c3d4e5f6"):
            shown = daemon.docker(*run, "--hostname", hostname, IMAGE, "show-config").stdout
            ids.add(json.loads(shown)["node_id"])
        assert ids == {"0123456789ab"}
        check = daemon.docker(*run, *env, IMAGE, "check", check=False).stdout
        assert (
            "warn node id: node id '0123456789ab' (state file) looks like a container id" in check
        )
    finally:
        daemon.docker("volume", "rm", "-f", volume, check=False)
