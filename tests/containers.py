"""A private Docker daemon, the project's image and its compose stack, for the tests that
run them for real (tests/integration/test_containers.py).

The daemon is Debian's docker.io, started by the tests and stopped by pid, with no bridge
and no iptables rules: containers use the host network, on loopback only. Its data root is
a cache under /var/cache/nbd-export-worker/docker, so images and build layers outlive the
run; containers and volumes left by an earlier run are removed when it starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.nbd import wait_for

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("NBD_BUILD_CACHE", "/var/cache/nbd-export-worker"))
DOCKERD = "/usr/sbin/dockerd"
#: Debian's client, whichever other one is on PATH: the daemon and client of one package.
DOCKER = "/usr/bin/docker"
COMPOSE = "docker-compose"
IMAGE = "nbd-export-worker:test"
#: Where the host trusts a site CA for HTTPS (pip in the image's build needs it then).
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


class DockerError(AssertionError):
    pass


@dataclass
class DockerDaemon:
    """dockerd on a socket of its own, started and stopped by its pid."""

    run_dir: Path
    data_root: Path = CACHE / "docker"
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def host(self) -> str:
        return f"unix://{self.run_dir / 'docker.sock'}"

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EXPORT_WORKER_")}
        return {**env, "DOCKER_HOST": self.host, "DOCKER_BUILDKIT": "1"}

    def start(self, timeout_s: float = 60) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.data_root.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        log = (self.run_dir / f"dockerd-{self.starts}.log").open("wb")
        self.proc = subprocess.Popen(
            [
                DOCKERD,
                # Never the default bridge (172.17.x) nor any rule in the host's firewall.
                "--bridge=none",
                "--iptables=false",
                "--ip6tables=false",
                "--ip-forward=false",
                "--ip-masq=false",
                f"--data-root={self.data_root}",
                f"--exec-root={self.run_dir / 'exec'}",
                f"--pidfile={self.run_dir / 'dockerd.pid'}",
                f"--host={self.host}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_for(self._answers, timeout_s, "dockerd to answer", interval_s=0.5)

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise DockerError(f"dockerd exited {self.proc.returncode}: see {self.run_dir}")
        return self.docker("version", check=False).returncode == 0

    def stop(self, timeout_s: float = 90) -> None:
        """SIGTERM, as at a shutdown: the daemon stops its containers, then itself."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        # dockerd leaves its host network namespace bind-mounted under the exec root.
        for mount in self._mounts_under(self.run_dir / "exec"):
            subprocess.run(["umount", "--lazy", mount], check=False, timeout=30)

    @staticmethod
    def _mounts_under(root: Path) -> list[str]:
        points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
        return sorted((p for p in points if p.startswith(f"{root}/")), reverse=True)

    def restart(self) -> None:
        self.stop()
        self.start()

    def docker(
        self, *args: str, check: bool = True, timeout_s: float = 120, input: bytes | None = None
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [DOCKER, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            input=input.decode() if input is not None else None,
        )
        if check and done.returncode != 0:
            raise DockerError(f"docker {' '.join(args)}: exit {done.returncode}\n{done.stderr}")
        return done

    def remove_leftovers(self) -> None:
        """Containers and volumes of an earlier run (restart policies would start them)."""
        ids = self.docker("ps", "-aq").stdout.split()
        if ids:
            self.docker("rm", "-f", *ids)
        self.docker("volume", "prune", "-f")

    def inspect(self, name: str) -> dict[str, Any]:
        data: list[dict[str, Any]] = json.loads(self.docker("inspect", name).stdout)
        return data[0]


@contextlib.contextmanager
def running_daemon(run_dir: Path) -> Iterator[DockerDaemon]:
    daemon = DockerDaemon(run_dir)
    daemon.start()
    try:
        daemon.remove_leftovers()
        yield daemon
    finally:
        with contextlib.suppress(DockerError, subprocess.SubprocessError):
            daemon.remove_leftovers()
        daemon.stop()


def build_image(daemon: DockerDaemon, tag: str = IMAGE) -> float:
    """The base (scripts/container-base.sh: made from Debian's mirror when no registry
    answers), then the project's image. Returns the build's seconds."""
    env = {**daemon.env, "DOCKER": DOCKER}
    subprocess.run(["bash", str(ROOT / "scripts/container-base.sh")], env=env, check=True)
    args = ["build", "--network=host", "-t", tag]
    if CA_BUNDLE.is_file():
        args += ["--secret", f"id=ca-bundle,src={CA_BUNDLE}"]
    started = time.monotonic()
    done = daemon.docker(*args, str(ROOT), check=False, timeout_s=1500)
    if done.returncode != 0:
        raise DockerError(f"docker build failed:\n{done.stderr[-4000:]}")
    return time.monotonic() - started


@dataclass
class ComposeStack:
    """docker-compose.yml as an operator runs it, under a project name of its own."""

    daemon: DockerDaemon
    project: str
    #: The variables the operator exports (node id, advertise host, NBD_STACK_*).
    variables: Mapping[str, str]
    compose_file: Path = ROOT / "docker-compose.yml"
    calls: list[str] = field(default_factory=list)

    def compose(
        self, *args: str, check: bool = True, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        if args[0] not in ("ps", "logs"):
            self.calls.append(" ".join(args))
        done = subprocess.run(
            [COMPOSE, "-f", str(self.compose_file), "-p", self.project, *args],
            env={**self.daemon.env, **(env if env is not None else self.variables)},
            capture_output=True,
            text=True,
            timeout=300,
        )
        if check and done.returncode != 0:
            raise DockerError(f"compose {' '.join(args)}: exit {done.returncode}\n{done.stderr}")
        return done

    def container(self, service: str) -> str:
        ids = self.compose("ps", "-q", service).stdout.split()
        if len(ids) != 1:
            raise DockerError(f"{service}: expected one container, found {ids}")
        return ids[0]

    def state(self, service: str) -> dict[str, Any]:
        state: dict[str, Any] = self.daemon.inspect(self.container(service))["State"]
        return state

    def health(self, service: str) -> str | None:
        health = self.state(service).get("Health")
        return None if health is None else str(health["Status"])

    def wait_healthy(self, service: str, timeout_s: float = 90) -> None:
        wait_for(lambda: self.health(service) == "healthy", timeout_s, f"{service} healthy", 1)

    def exec(
        self, service: str, *args: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self.compose("exec", "-T", service, *args, check=check)

    def logs(self, service: str) -> str:
        return self.compose("logs", "--no-color", service, check=False).stdout
