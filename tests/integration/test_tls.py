"""TLS on every link, failing closed: NBD (nbds://) first.

The tests make their own CA and certificates (harness/tls_certs.py, openssl) and judge the
NBD side with real clients: nbdcopy and nbdinfo over nbds://, qemu-img with
tls-creds-x509.

Over 400 lines (budget 700) as one capability's tests, with the helpers they share.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import ssl
import struct
import subprocess
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomysql
import pytest
from aio_pika.abc import AbstractConnection
from pydantic import AnyUrl

from harness.mariadb import MariaDbInstance, running_mariadb
from harness.nbd import (
    REP_ACK,
    REP_ERR_TLS_REQD,
    NbdServerProcess,
    free_port,
    go_reply,
    server_binary,
    wait_for,
)
from harness.sql import execute_sql
from harness.tcp_proxy import TcpProxy
from harness.tls_certs import Pki, make_pki
from harness.worker_process import env_for
from tests.conftest import (
    DISK_SIZE,
    MYSQL_URL,
    NODE,
    clean_environ,
    job,
    make_disk,
    run_worker_cli,
    running_worker,
    scheduler_for,
)
from worker.db_tls import session_cipher
from worker.errors import ServerUnavailable
from worker.metrics import build_metrics
from worker.nbd.server import NbdServer
from worker.nbd.tls_selftest import ServerTlsFiles, children_cpu_s, run_tls_close_test
from worker.nbd.wire import NbdTls, export_state
from worker.repository import Repository
from worker.settings import Settings
from worker.tls import TlsFiles

ROOT = Path(__file__).resolve().parents[2]
UNPATCHED_BIN = Path("/var/cache/nbd-export-worker/nbd-server-unpatched/nbd-server")


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


def _client(pki: Pki) -> NbdTls:
    files = TlsFiles(pki.ca, pki.client_cert, pki.client_key)
    return NbdTls(files.client_context("NBD"), "127.0.0.1")


def _server_files(pki: Pki) -> ServerTlsFiles:
    return ServerTlsFiles(pki.server_cert, pki.server_key, pki.ca)


@pytest.mark.parametrize(
    ("binary", "spins"),
    [(server_binary(), False), (str(UNPATCHED_BIN), True)],
    ids=["ours", "debian"],
)
async def test_tls_close_self_test_tells_a_spinning_build(
    pki: Pki, binary: str, spins: bool
) -> None:
    assert Path(binary).exists(), "run scripts/install-system-deps.sh --with-test-tools"
    verdict = await run_tls_close_test(binary, _server_files(pki), _client(pki))
    assert verdict.ok is not spins, verdict.failures
    if spins:
        assert "spun at" in verdict.failures[0]


# --- the worker with NBD TLS on ---------------------------------------------------------


@pytest.fixture
def nbd_server(tmp_path: Path, pki: Pki) -> Iterator[NbdServerProcess]:
    """This module's server offers TLS (overrides conftest's)."""
    with NbdServerProcess.running(tmp_path / "nbd", tls=pki) as server:
        yield server


def _with_nbd_tls(settings: Settings, pki: Pki) -> Settings:
    return settings.model_copy(
        update={
            "nbd_tls": True,
            "nbd_tls_ca": pki.ca,
            "nbd_tls_cert": pki.client_cert,
            "nbd_tls_key": pki.client_key,
        }
    )


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def _image(path: Path) -> Path:
    """A VM disk image: data, a zero run of 8 MiB, more data."""
    with path.open("wb") as f:
        f.truncate(DISK_SIZE)
        f.write(os.urandom(2 << 20))
        f.seek(12 << 20)
        f.write(os.urandom(1 << 20))
    return path


def _foreign_client(tmp_path: Path, pki: Pki) -> Path:
    """A copy tool that trusts the server's CA but holds a certificate of another CA."""
    other = make_pki(tmp_path / "other-ca")
    mixed = tmp_path / "foreign-client"
    mixed.mkdir()
    shutil.copy(pki.ca, mixed / "ca-cert.pem")
    shutil.copy(other.client_cert, mixed / "client-cert.pem")
    shutil.copy(other.client_key, mixed / "client-key.pem")
    return mixed


async def test_copy_tools_write_through_a_tls_export_and_nobody_else_gets_in(
    settings: Settings,
    amqp: AbstractConnection,
    disks_dir: Path,
    nbd_server: NbdServerProcess,
    pki: Pki,
    tmp_path: Path,
) -> None:
    tls = _with_nbd_tls(settings, pki)
    async with running_worker(tls):
        scheduler = await scheduler_for(amqp, tls)
        disk = make_disk(disks_dir, "vdb", b"\xa5" * (4 << 20))  # a volume with old data
        reply = await scheduler.request(job(device=disk))
        assert (reply["status"], reply["action"], reply["tls"]) == ("ready", "created", True)
        name, port = reply["export_name"], nbd_server.port
        assert "force_tls = true" in (nbd_server.conf_dir / f"{name}.conf").read_text()

        # Plain clients are told TLS is required, whoever they are.
        assert go_reply(port, name) == REP_ERR_TLS_REQD
        assert _run("nbdinfo", f"nbd://127.0.0.1:{port}/{name}").returncode != 0

        uri = f"nbds://127.0.0.1:{port}/{name}?tls-certificates={pki.dir}"
        image = _image(tmp_path / "disk.img")
        copy = _run("nbdcopy", "--flush", "--connections=4", str(image), uri)
        assert copy.returncode == 0, copy.stderr
        assert _run("cmp", str(image), str(disk)).returncode == 0
        shown = json.loads(_run("nbdinfo", "--json", uri).stdout)
        info = shown["exports"][0]
        assert (info["can_flush"], info["can_zero"], shown["TLS"]) == (True, True, True), shown

        # qemu-img with its own TLS stack (GnuTLS through QEMU's tls-creds-x509).
        image2 = _image(tmp_path / "disk2.img")
        qemu = _run(
            "qemu-img", "convert", "-n", "-f", "raw",
            "--object", f"tls-creds-x509,id=tls0,dir={pki.dir},endpoint=client",
            "--target-image-opts", str(image2),
            f"driver=nbd,host=127.0.0.1,port={port},export={name},tls-creds=tls0",
        )  # fmt: skip
        assert qemu.returncode == 0, qemu.stderr
        assert _run("cmp", str(image2), str(disk)).returncode == 0

        # A certificate of another CA, or none, is refused by the server.
        foreign = _foreign_client(tmp_path, pki)
        refused = _run("nbdinfo", f"nbds://127.0.0.1:{port}/{name}?tls-certificates={foreign}")
        assert refused.returncode != 0
        no_cert = tmp_path / "no-cert"
        no_cert.mkdir()
        shutil.copy(pki.ca, no_cert / "ca-cert.pem")
        assert (
            _run("nbdinfo", f"nbds://127.0.0.1:{port}/{name}?tls-certificates={no_cert}").returncode
            != 0
        )

        again = await scheduler.request(job(vm_id=reply["vm_id"], device=disk))
        assert (again["action"], again["reused"], again["tls"]) == ("reused", True, True)
        await scheduler.channel.close()

        # Every one of those TLS clients has gone: no child of the server is left busy.
        _, before = children_cpu_s(nbd_server.pid)
        await asyncio.sleep(1)
        _, after = children_cpu_s(nbd_server.pid)
        assert after - before < 0.3, f"children used {after - before:.2f} s of CPU in 1 s"

    check = await asyncio.to_thread(run_worker_cli, "check", env=env_for(tls))
    assert "ok   every export refuses plain clients (force_tls)" in check.stdout, check.stdout
    assert "ok   nbd-server lets go of TLS clients that close cleanly" in check.stdout


async def test_a_server_without_tls_is_refused_and_never_probed_in_clear(
    settings: Settings, pki: Pki, tmp_path: Path
) -> None:
    with NbdServerProcess.running(tmp_path / "plain") as plain:
        tls = _with_nbd_tls(settings, pki).model_copy(
            update={
                "nbd_port": plain.port,
                "nbd_pid_file": plain.pid_file,
                "nbd_config_file": plain.config_file,
                "nbd_conf_dir": plain.conf_dir,
            }
        )
        server = NbdServer(tls, build_metrics("tls-test"))
        with pytest.raises(ServerUnavailable, match="refused STARTTLS"):
            await server.ping()
        check = await asyncio.to_thread(run_worker_cli, "check", env=env_for(tls))
        assert check.returncode == 1
        assert "refused STARTTLS" in check.stdout
        assert "FAIL config: nbd-server offers TLS: [generic] lacks certfile" in check.stdout
        health = await asyncio.to_thread(
            run_worker_cli, "healthcheck", "--nbd-server", env=env_for(tls)
        )
        assert health.returncode == 1
        assert "refused STARTTLS" in health.stderr


async def test_exports_loaded_before_tls_are_named_until_a_restart(
    settings: Settings,
    amqp: AbstractConnection,
    disks_dir: Path,
    nbd_server: NbdServerProcess,
    pki: Pki,
) -> None:
    disk = make_disk(disks_dir, "vdc")
    async with running_worker(settings):  # TLS off: a plain export
        scheduler = await scheduler_for(amqp, settings)
        before = await scheduler.request(job(device=disk))
        assert (before["action"], before["tls"]) == ("created", False)
        await scheduler.channel.close()
    name = before["export_name"]
    tls = _with_nbd_tls(settings, pki)
    async with running_worker(tls):  # reconciliation rewrites the snippet with force_tls
        scheduler = await scheduler_for(amqp, tls)
        after = await scheduler.request(job(vm_id=before["vm_id"], device=disk))
        assert (after["action"], after["tls"]) == ("reused", True)
        await scheduler.channel.close()
    assert "force_tls = true" in (nbd_server.conf_dir / f"{name}.conf").read_text()
    assert go_reply(nbd_server.port, name) == REP_ACK  # the loaded section has no force_tls

    def status() -> dict[str, Any]:
        proc = run_worker_cli("status", "--json", env=env_for(tls))
        (row,) = json.loads(proc.stdout)
        return dict(row)

    assert (await asyncio.to_thread(status))["tls_only"] is False
    table = await asyncio.to_thread(run_worker_cli, "status", env=env_for(tls))
    assert "PLAINTEXT" in table.stdout
    check = await asyncio.to_thread(run_worker_cli, "check", env=env_for(tls))
    assert check.returncode == 1
    assert (
        f"FAIL every export refuses plain clients (force_tls): {name} were loaded" in check.stdout
    )
    reconciled = await asyncio.to_thread(run_worker_cli, "reconcile", "--dry-run", env=env_for(tls))
    assert f"restart of nbd-server fixes): 1\n  {name}" in reconciled.stdout, reconciled.stdout

    nbd_server.stop()
    nbd_server.start()
    assert go_reply(nbd_server.port, name) == REP_ERR_TLS_REQD
    assert (await asyncio.to_thread(status))["tls_only"] is True


# --- the database ------------------------------------------------------------------------

DB_USER, DB_PASSWORD = "exporter", "Db-Pw-7f3c2a9e41d8"


@pytest.fixture
def tls_mariadb(tmp_path: Path, pki: Pki) -> Iterator[MariaDbInstance]:
    """A private MariaDB that offers TLS, with a user that may log in over TLS only."""
    with running_mariadb(tmp_path / "mariadb", tls=pki) as db:
        db.sql(
            f"CREATE USER '{DB_USER}'@'127.0.0.1' IDENTIFIED BY '{DB_PASSWORD}' REQUIRE SSL; "
            f"GRANT ALL ON *.* TO '{DB_USER}'@'127.0.0.1'"
        )
        yield db


def _with_database_tls(settings: Settings, pki: Pki, url: str) -> Settings:
    return settings.model_copy(
        update={"database_url": AnyUrl(url), "database_tls": True, "database_tls_ca": pki.ca}
    )


async def test_the_worker_runs_on_a_database_over_tls(
    settings: Settings,
    tls_mariadb: MariaDbInstance,
    pki: Pki,
    amqp: AbstractConnection,
    disks_dir: Path,
) -> None:
    url = f"mysql://{DB_USER}:{DB_PASSWORD}@127.0.0.1:{tls_mariadb.port}/nbd_exports_tls"
    tls = _with_database_tls(settings, pki, url)
    migrated = await asyncio.to_thread(run_worker_cli, "migrate", env=env_for(tls))
    assert migrated.returncode == 0, migrated.stderr
    async with running_worker(tls):
        scheduler = await scheduler_for(amqp, tls)
        reply = await scheduler.request(job(device=make_disk(disks_dir, "vdd")))
        assert (reply["status"], reply["action"]) == ("ready", "created"), reply
        await scheduler.channel.close()
    context = TlsFiles(pki.ca).client_context("database")
    repository = await Repository.connect(
        AnyUrl(url), node_id="tls-test", pool_size=1, timeout_s=5, tls=context
    )
    try:
        assert len(await repository.list_mappings(active_only=True, node_id=NODE)) == 1
    finally:
        await repository.close()
    # The server says so: the session is encrypted, and the user may not log in otherwise.
    conn = await aiomysql.connect(
        host="127.0.0.1", port=tls_mariadb.port, user=DB_USER, password=DB_PASSWORD, ssl=context
    )
    try:
        assert await session_cipher(conn)
    finally:
        conn.close()


async def test_a_plaintext_database_is_refused_before_any_credential_is_sent(
    settings: Settings, pki: Pki
) -> None:
    # The machine's MariaDB offers no TLS; the proxy records what the client sends it.
    (row,) = await execute_sql(AnyUrl(MYSQL_URL), "SHOW VARIABLES LIKE 'have_ssl'")
    assert row[1] != "YES"
    proxy = TcpProxy("127.0.0.1", 3306)
    port = await proxy.start()
    try:
        url = f"mysql://{DB_USER}:{DB_PASSWORD}@127.0.0.1:{port}/nbd_exports_tls"
        tls = _with_database_tls(settings, pki, url)
        for command in ("migrate", "status"):
            done = await asyncio.to_thread(run_worker_cli, command, env=env_for(tls))
            assert done.returncode == 1, done.stdout + done.stderr
            assert "offers none: refusing to log in in plaintext" in done.stderr
        check = await asyncio.to_thread(run_worker_cli, "check", env=env_for(tls))
        assert "FAIL database reachable and migrated" in check.stdout
        assert "refusing to log in in plaintext" in check.stdout
        # Not a byte of a login: no user name, no password hash, nothing at all.
        assert bytes(proxy.client_bytes) == b""
    finally:
        await proxy.stop()


# --- the broker ---------------------------------------------------------------------------


@contextlib.contextmanager
def _stunnel(
    directory: Path, pki: Pki, upstream: int = 5672, *, client_certificate: bool = False
) -> Iterator[int]:
    """A TLS listener in front of the machine's RabbitMQ (Debian's stunnel4), started and
    stopped by its pid; yields its port. `client_certificate`: one signed by the PKI's CA
    is required."""
    directory.mkdir()
    port = free_port()
    config = directory / "stunnel.conf"
    config.write_text(
        "foreground = yes\n"
        f"output = {directory / 'stunnel.log'}\n"
        "[amqps]\n"
        f"accept = 127.0.0.1:{port}\n"
        f"connect = 127.0.0.1:{upstream}\n"
        f"cert = {pki.server_cert}\n"
        f"key = {pki.server_key}\n"
        "sslVersionMin = TLSv1.2\n"
        + (f"verify = 2\nCAfile = {pki.ca}\n" if client_certificate else "")
    )
    proc = subprocess.Popen(["stunnel4", str(config)], stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _listening(port), 15, "stunnel")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


async def test_the_worker_works_through_a_tls_broker_listener(
    settings: Settings, pki: Pki, tmp_path: Path, amqp: AbstractConnection, disks_dir: Path
) -> None:
    with _stunnel(tmp_path / "stunnel", pki) as port:
        url = f"amqps://guest:guest@127.0.0.1:{port}/?cafile={pki.ca}"
        tls = settings.model_copy(update={"amqp_url": url})
        async with running_worker(tls):
            scheduler = await scheduler_for(amqp, tls)  # the scheduler's own plain link
            reply = await scheduler.request(job(device=make_disk(disks_dir, "vde")))
            assert (reply["status"], reply["action"]) == ("ready", "created"), reply
            await scheduler.channel.close()
        check = await asyncio.to_thread(run_worker_cli, "check", env=env_for(tls))
        assert f"ok   broker amqps://guest:***@127.0.0.1:{port}/?cafile={pki.ca} reachable" in (
            check.stdout
        )
        # A listener whose certificate another CA signed is not the broker.
        other = make_pki(tmp_path / "other-ca")
        with _stunnel(tmp_path / "stunnel-other", other) as other_port:
            wrong = url.replace(f":{port}/", f":{other_port}/")
            check = await asyncio.to_thread(
                run_worker_cli,
                "check",
                env=env_for(settings.model_copy(update={"amqp_url": wrong})),
            )
            assert "reachable: TLS failed: [SSL: CERTIFICATE_VERIFY_FAILED]" in check.stdout


async def test_an_amqps_url_to_a_plaintext_port_is_refused_and_sends_no_credential(
    settings: Settings, pki: Pki
) -> None:
    proxy = TcpProxy("127.0.0.1", 5672)  # the plaintext AMQP port, recording the client
    port = await proxy.start()
    try:
        url = f"amqps://guest:guest@127.0.0.1:{port}/?cafile={pki.ca}"
        tls = settings.model_copy(update={"amqp_url": url})
        check = await asyncio.to_thread(run_worker_cli, "check", env=env_for(tls))
        assert check.returncode == 1
        assert (
            f"FAIL broker amqps://guest:***@127.0.0.1:{port}/?cafile={pki.ca} reachable: TLS failed"
            in (check.stdout)
        ), check.stdout
        request = await asyncio.to_thread(
            run_worker_cli, "request", "--vm-id", str(uuid.uuid4()), "--vm-name", "x",
            "--device", "/dev/vdb", "--timeout", "3", env=env_for(tls),
        )  # fmt: skip
        assert request.returncode != 0
        sent = bytes(proxy.client_bytes)
        assert sent[:1] == b"\x16"  # every connection began with a TLS ClientHello
        assert b"guest" not in sent
        assert b"AMQP" not in sent
    finally:
        await proxy.stop()


@pytest.mark.parametrize(
    ("urls", "message"),
    [
        ("amqps://a:b@127.0.0.1:5671/,amqp://a:b@127.0.0.1:5672/", "mixes amqp:// and amqps://"),
        ("amqps://a:b@127.0.0.1:5671/?no_verify_ssl=1", "no_verify_ssl is refused"),
        # aiormq takes a blank one as "do not verify" too.
        ("amqps://a:b@127.0.0.1:5671/?no_verify_ssl=", "no_verify_ssl is refused"),
        ("amqps://a:b@127.0.0.1:5671/?cafile=/ca.pem&no_verify_ssl", "no_verify_ssl is refused"),
        ("http://127.0.0.1/", "must be amqp:// or amqps://"),
    ],
)
def test_a_half_tls_broker_list_is_a_settings_error(urls: str, message: str) -> None:
    done = run_worker_cli("show-config", env=clean_environ(EXPORT_WORKER_AMQP_URL=urls))
    assert done.returncode == 2
    assert message in done.stderr
    assert "a:b@" not in done.stderr


@pytest.mark.parametrize(
    "variables",
    [
        {"EXPORT_WORKER_NBD_TLS_CA": "/ca.pem"},
        {"EXPORT_WORKER_NBD_TLS": "ture", "EXPORT_WORKER_NBD_TLS_CERT": "/c.pem"},
        {"EXPORT_WORKER_DATABASE_TLS_CA": "/ca.pem"},
        {"EXPORT_WORKER_NBD_TLS": "true", "EXPORT_WORKER_NBD_TLS_CA": "/ca.pem"},
    ],
    ids=["nbd-file-without-flag", "nbd-flag-typo", "database-file-without-flag", "nbd-no-cert"],
)
def test_tls_settings_half_set_are_a_settings_error(variables: dict[str, str]) -> None:
    done = run_worker_cli("show-config", env=clean_environ(**variables))
    assert done.returncode == 2, done.stdout
    assert "invalid settings" in done.stderr


async def test_bytes_injected_after_the_starttls_answer_are_refused(pki: Pki) -> None:
    """A fake server: the ACK to STARTTLS and, in the same segment, a forged GO reply that
    would be read as if it came over TLS."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(struct.pack(">QQH", 0x4E42444D41474943, 0x49484156454F5054, 3))
        await reader.readexactly(4 + 16)  # client flags, the STARTTLS option
        ack = struct.pack(">QIII", 0x3E889045565A9, OPT_STARTTLS, REP_ACK, 0)
        forged = struct.pack(">QIII", 0x3E889045565A9, 7, REP_ACK, 0)
        writer.write(ack + forged)
        await writer.drain()
        await asyncio.sleep(5)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ServerUnavailable, match="sent data after its STARTTLS answer"):
            await export_state("127.0.0.1", port, "x", 5, tls=_client(pki))
    finally:
        server.close()


async def test_tls_keys_and_passwords_stay_out_of_show_config_check_and_logs(
    settings: Settings, pki: Pki, tls_mariadb: MariaDbInstance, tmp_path: Path
) -> None:
    url = f"mysql://{DB_USER}:{DB_PASSWORD}@127.0.0.1:{tls_mariadb.port}/nbd_exports_tls"
    with _stunnel(tmp_path / "stunnel", pki) as port:
        tls = _with_nbd_tls(_with_database_tls(settings, pki, url), pki).model_copy(
            update={
                "amqp_url": f"amqps://guest:guest@127.0.0.1:{port}/?cafile={pki.ca}",
                "log_level": "DEBUG",
            }
        )
        env = env_for(tls)
        outputs = [
            await asyncio.to_thread(run_worker_cli, *command, env=env)
            for command in (["migrate"], ["show-config"], ["check"], ["status"])
        ]
    text = "".join(done.stdout + done.stderr for done in outputs)
    assert "nbd_tls_key" in text  # show-config names the key's path...
    for key in (pki.client_key, pki.server_key):  # ...never what it holds
        body = [line for line in key.read_text().splitlines() if "-----" not in line]
        assert not [line for line in body if line in text]
    assert DB_PASSWORD not in text
    assert "guest:guest" not in text


# --- the sample base config ---------------------------------------------------------------

OPT_STARTTLS = 5


def _recv(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "connection closed"
        data += chunk
    return data


def _tls_handshake(port: int, pki: Pki, version: ssl.TLSVersion) -> bool:
    """NBD STARTTLS, then a TLS handshake at exactly `version`: whether the server took it."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        assert _recv(sock, 18)[:8] == b"NBDMAGIC"
        sock.sendall(struct.pack(">I", 1 | 2))  # fixed newstyle, no zeroes
        sock.sendall(struct.pack(">QII", 0x49484156454F5054, OPT_STARTTLS, 0))
        reply = _recv(sock, 20)
        assert struct.unpack(">QIII", reply)[2] == REP_ACK
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(str(pki.ca))
        context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer old versions
        with warnings.catch_warnings():  # TLS 1.1 on purpose: what the server must refuse
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = context.maximum_version = version
        try:
            with context.wrap_socket(sock, server_hostname="127.0.0.1"):
                return True
        except (ssl.SSLError, OSError):
            return False


@pytest.mark.parametrize(
    "sample", ["deploy/systemd/nbd-server.config", "deploy/compose/nbd-server.conf"]
)
def test_the_sample_configs_tls_lines_allow_tls_1_2_and_newer_only(
    sample: str, pki: Pki, tmp_path: Path
) -> None:
    text = (ROOT / sample).read_text()
    for key, path in (
        ("certfile", pki.server_cert),
        ("keyfile", pki.server_key),
        ("cacertfile", pki.ca),
    ):
        text, found = re.subn(rf"^    # {key} = .*$", f"    {key} = {path}", text, flags=re.M)
        assert found == 1, key
    text, found = re.subn(r"^    # (tlsprio = .*)$", r"    \1", text, flags=re.M)
    assert found == 1

    def serve(config: str, name: str) -> NbdServerProcess:
        server = NbdServerProcess(tmp_path / name)
        server.root.mkdir()
        server.conf_dir.mkdir()
        config = re.sub(r"^    port = \d+$", f"    port = {server.port}", config, flags=re.M)
        config = re.sub(
            r"^    includedir = .*$", f"    includedir = {server.conf_dir}", config, flags=re.M
        )
        server.config_file.write_text(config)
        server.start()
        return server

    server = serve(text, "sample")
    try:
        assert _tls_handshake(server.port, pki, ssl.TLSVersion.TLSv1_2)
        assert _tls_handshake(server.port, pki, ssl.TLSVersion.TLSv1_3)
        assert not _tls_handshake(server.port, pki, ssl.TLSVersion.TLSv1_1)
    finally:
        server.stop()
    # Why the line is there: without it, nbd-server takes TLS 1.1.
    server = serve(re.sub(r"^    tlsprio = .*\n", "", text, flags=re.M), "no-tlsprio")
    try:
        assert _tls_handshake(server.port, pki, ssl.TLSVersion.TLSv1_1)
    finally:
        server.stop()


async def test_a_certificate_for_another_name_is_refused_on_nbd_and_amqp(
    settings: Settings, tmp_path: Path
) -> None:
    """Signed by the trusted CA, but naming another host: not the server asked for."""
    elsewhere = make_pki(tmp_path / "elsewhere", server_names="DNS:elsewhere.example")
    with NbdServerProcess.running(tmp_path / "nbd-elsewhere", tls=elsewhere) as server:
        tls = _with_nbd_tls(settings, elsewhere).model_copy(
            update={"nbd_port": server.port, "nbd_pid_file": server.pid_file}
        )
        with pytest.raises(ServerUnavailable, match="IP address mismatch"):
            await NbdServer(tls, build_metrics("tls-test")).ping()
    with _stunnel(tmp_path / "stunnel", elsewhere) as port:
        url = f"amqps://guest:guest@127.0.0.1:{port}/?cafile={elsewhere.ca}"
        env = env_for(settings.model_copy(update={"amqp_url": url}))
        check = await asyncio.to_thread(run_worker_cli, "check", env=env)
        assert "reachable: TLS failed" in check.stdout
        assert "IP address mismatch" in check.stdout


async def test_a_database_certificate_for_another_name_is_refused(
    settings: Settings, tmp_path: Path
) -> None:
    elsewhere = make_pki(tmp_path / "elsewhere", server_names="DNS:elsewhere.example")
    with running_mariadb(tmp_path / "mariadb", tls=elsewhere) as db:
        url = f"mysql://root@127.0.0.1:{db.port}/nbd_exports_tls"
        tls = _with_database_tls(settings, elsewhere, url)
        done = await asyncio.to_thread(run_worker_cli, "migrate", env=env_for(tls))
        assert done.returncode == 1
        assert "IP address mismatch" in done.stderr, done.stderr


async def test_a_broker_that_requires_a_client_certificate_gets_the_configured_one(
    settings: Settings, pki: Pki, tmp_path: Path
) -> None:
    with _stunnel(tmp_path / "stunnel", pki, client_certificate=True) as port:
        base = f"amqps://guest:guest@127.0.0.1:{port}/?cafile={pki.ca}"
        for url, reachable in (
            (base, False),
            (f"{base}&certfile={pki.client_cert}&keyfile={pki.client_key}", True),
        ):
            env = env_for(settings.model_copy(update={"amqp_url": url}))
            check = await asyncio.to_thread(run_worker_cli, "check", env=env)
            line = f"broker {url.replace('guest:guest', 'guest:***')} reachable"
            assert (f"ok   {line}" in check.stdout) is reachable, check.stdout


async def test_a_tls_copy_is_counted_by_the_live_view(
    settings: Settings, amqp: AbstractConnection, disks_dir: Path, pki: Pki, tmp_path: Path
) -> None:
    """nbdcopy over nbds:// with 2 connections: each seen as TLS, the data written counted,
    none of it as read (GnuTLS receives with recv(2), not in rchar), none left open after."""
    from tests.integration.test_live_view import inspect, slow_source, sparse_image, start_copy

    tls = _with_nbd_tls(settings, pki).model_copy(update={"live_sample_s": 0.2})
    data = sparse_image(tmp_path / "source.img", DISK_SIZE, data_every=1 << 20)  # 8 MiB
    async with running_worker(tls):
        scheduler = await scheduler_for(amqp, tls)
        ready = await scheduler.request(job(device=make_disk(disks_dir, "vdf")))
        name, seen = ready["export_name"], []
        uri = f"nbds://127.0.0.1:{ready['nbd_port']}/{name}?tls-certificates={pki.dir}"
        # 2 MB/s after a first burst of 4 MB (nbdkit's rate filter): about 2 s.
        with slow_source(tmp_path / "source.img", tmp_path / "src.sock", rate="16M") as source:
            copy = await start_copy(source, uri, connections=2)
            while copy.returncode is None:
                seen += (await inspect(scheduler, ready))["live"]["connections"]
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(copy.wait(), 0.2)
            assert copy.returncode == 0, await copy.communicate()
        for _ in range(50):  # the server's children end just after the copy does
            after = (await inspect(scheduler, ready))["live"]
            if not after["connections"]:
                break
        assert all(c["tls"] for c in seen), seen
        assert len({c["client_port"] for c in seen}) == after["connections_total"] == 2, after
        assert abs(after["bytes_written"] - data) <= 0.05 * data, (after, data)
        assert after["bytes_read"] < 64 << 10, after  # the certificate files at STARTTLS
        assert after["connections"] == []
        await scheduler.channel.close()
