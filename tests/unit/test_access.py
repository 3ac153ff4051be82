"""Client addresses, authfiles and the warnings `check` gives about exposure."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from worker.access import admits, authfile_line, normalize_client_addresses
from worker.commands.check import _exposure_warnings
from worker.messages import PrepareExport
from worker.metrics import build_metrics
from worker.nbd.authfiles import (
    AuthfileState,
    authfile_state,
    render_authfile,
    searchable_by,
    write_authfile,
)
from worker.nbd.probes import canary_for
from worker.nbd.server import NbdServer
from worker.settings import Settings

JOB = {"job_id": "j", "vm_id": "4205784a-098a-40f1-1f1e-a5cd2597fd59", "vm_name": "v",
       "disk_unit_number": 0, "device_path": "/dev/vdb"}  # fmt: skip


@pytest.mark.parametrize(
    ("given", "normalized"),
    [
        (["127.0.0.1"], ("127.0.0.1",)),
        (["127.0.0.1/32", "127.0.0.1"], ("127.0.0.1",)),
        (["::1", "10.0.0.0/8", "0:0:0:0:0:0:0:1"], ("10.0.0.0/8", "::1")),
        (["FD00:0:0::/64"], ("fd00::/64",)),
        (["::ffff:10.1.2.3"], ("10.1.2.3",)),
        (["::ffff:10.0.0.0/104"], ("10.0.0.0/8",)),
        (["10.0.0.2", "10.0.0.1"], ("10.0.0.1", "10.0.0.2")),
    ],
)
def test_addresses_are_normalized(given: list[str], normalized: tuple[str, ...]) -> None:
    assert normalize_client_addresses(given) == normalized
    assert PrepareExport.model_validate({**JOB, "client_addresses": given}).client_addresses == (
        normalized
    )


@pytest.mark.parametrize(
    ("given", "reason"),
    [
        (["10.0.0.5/24"], "host bits"),
        (["fe80::1%eth0"], "zone ids"),
        (["localhost"], "hostnames are not allowed"),
        (["127.0.0.1\n0.0.0.0/0"], "not a numeric"),
        (["127.0.0.1#"], "not a numeric"),
        (["[::1]"], "not a numeric"),
        (["127.1"], "does not appear to be"),
        ([7], "must be a string"),
        ([], "1 to 16"),
        (["10.0.0.1"] * 17, "1 to 16"),
        ([f"10.0.{i // 256}.{i % 256}" for i in range(10_000)], "1 to 16"),
    ],
)
def test_anything_else_is_refused_with_the_reason(given: list[object], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        normalize_client_addresses(given)
    with pytest.raises(ValidationError, match="client_addresses"):
        PrepareExport.model_validate({**JOB, "client_addresses": given})


def test_authfile_lines_always_carry_their_prefix_length() -> None:
    # nbd-server takes a bare entry's length from the client's family: a bare IPv4 entry
    # never matches a client a dual-stack socket sees as ::ffff:a.b.c.d.
    assert authfile_line("127.0.0.1") == "127.0.0.1/32"
    assert authfile_line("::1") == "::1/128"
    assert authfile_line("10.0.0.0/8") == "10.0.0.0/8"
    assert render_authfile("e", ["10.0.0.1", "127.0.0.1", "10.0.0.1"]).decode().splitlines()[
        1:
    ] == ["10.0.0.1/32", "127.0.0.1/32"]


def test_a_released_authfile_admits_nobody_but_exists(tmp_path: Path) -> None:
    content = render_authfile("e", [])
    assert all(line.startswith("#") for line in content.decode().splitlines())
    path = tmp_path / "e.allow"
    assert authfile_state(path, content) is AuthfileState.MISSING
    assert write_authfile(path, content) is True
    assert authfile_state(path, content) is AuthfileState.OK
    assert write_authfile(path, content) is False  # unchanged: not written again


def test_authfile_state_tells_what_is_wrong(tmp_path: Path) -> None:
    path = tmp_path / "e.allow"
    content = render_authfile("e", ["10.0.0.1"])
    write_authfile(path, content)
    path.write_bytes(content + b"0.0.0.0/0\n")
    assert authfile_state(path, content) is AuthfileState.WRONG
    write_authfile(path, content)
    os.chmod(path, 0o600)  # the server's user (another one) could not read it: open to all
    assert authfile_state(path, content) is AuthfileState.UNREADABLE
    path.unlink()
    path.symlink_to(tmp_path / "elsewhere")
    assert authfile_state(path, content) is AuthfileState.UNREADABLE
    path.unlink()
    path.mkdir()
    assert authfile_state(path, content) is AuthfileState.UNREADABLE


def test_admits_compares_hosts_with_networks() -> None:
    assert admits(["127.0.0.0/8"], "127.255.255.254")
    assert not admits(["127.0.0.1", "::1"], "127.255.255.254")
    # On a dual-stack socket nbd-server sees IPv4 clients as ::ffff:a.b.c.d.
    assert admits(["::/0"], "127.0.0.1")
    assert not admits(["fd00::/8"], "127.0.0.1")


def test_check_warns_about_exposure() -> None:
    loopback = Settings.model_validate({"client_addresses": "127.0.0.1,::1"})
    assert _exposure_warnings(loopback, {"listenaddr": "127.0.0.1"}, []) == []
    found = dict(_exposure_warnings(loopback, {"allowlist": "true"}, []))
    assert "lists every export" in found["config: allowlist = true"]
    assert "listens on every address" in found["config: no listenaddr"]
    # A remote copy tool in a mapping, and replies that send it to loopback.
    found = dict(_exposure_warnings(loopback, {}, ["10.0.0.7"]))
    assert "config: no listenaddr" not in found
    assert "10.0.0.7" in found["EXPORT_WORKER_NBD_ADVERTISE_HOST"]
    remote = Settings.model_validate(
        {"client_addresses": "10.0.0.7", "nbd_advertise_host": "10.0.0.1"}
    )
    assert _exposure_warnings(remote, {}, []) == []


def test_settings_refuse_a_bad_default() -> None:
    with pytest.raises(ValidationError, match="hostnames"):
        Settings.model_validate({"client_addresses": "copy-host"})
    with pytest.raises(ValidationError, match="one address"):
        Settings(probe_source_address="127.0.0.0/8")
    assert Settings.model_validate({"client_addresses": " 10.0.0.1 , ::1"}).client_addresses == (
        "10.0.0.1",
        "::1",
    )


def test_the_reuse_check_sees_an_authfile_changed_in_place(tmp_path: Path) -> None:
    settings = Settings(auth_dir=tmp_path, nbd_host="127.0.0.1")
    server = NbdServer(settings, build_metrics("t"))
    name = "migration-vm-4205784a-098a-40f1-1f1e-a5cd2597fd59-disk0"
    door = tmp_path / f"{name}.allow"
    admitted = ("10.0.0.1",)
    write_authfile(door, server.authfile_content(name, admitted))
    assert server.admits(name, admitted)
    assert server.admits(name, admitted)  # from what it remembers
    assert not server.admits(name, ("10.0.0.2",))
    time.sleep(0.05)  # past a coarse clock tick
    text = door.read_text()
    with door.open("r+") as f:  # the same size, the same inode: only the ctime moves
        f.write(text.replace("10.0.0.1/32", "10.0.0.9/32"))
    assert not server.admits(name, admitted)
    door.unlink()
    assert not server.admits(name, admitted)


def test_a_directory_the_server_cannot_enter_is_found(tmp_path: Path) -> None:
    import tempfile

    top = Path(tempfile.mkdtemp(dir="/tmp"))  # /tmp: searchable by everyone
    auth = top / "auth"
    auth.mkdir()
    try:
        nobody, nogroup = 65534, {65534}
        os.chmod(top, 0o755)
        assert searchable_by(auth, nobody, nogroup)
        os.chmod(top, 0o700)  # owned by root: nobody cannot pass through it
        assert not searchable_by(auth, nobody, nogroup)
        assert searchable_by(auth, 0, set())
        os.chmod(top, 0o750)
        os.chown(top, 0, 65534)
        assert searchable_by(auth, nobody, nogroup)
    finally:
        os.chmod(top, 0o755)
        auth.rmdir()
        top.rmdir()


def test_the_canary_is_used_only_on_ipv4_loopback() -> None:
    assert canary_for("127.0.0.1", "127.0.0.1") == "127.255.255.254"
    assert canary_for("10.0.0.5", "10.0.0.5") is None  # from 127/8 connect() fails
    assert canary_for("::1", "::1") is None
