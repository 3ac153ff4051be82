from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from worker.errors import ServerUnavailable, UnsafeServer
from worker.nbd.files import (
    DataPathOptions,
    ExportSpec,
    SnippetWrite,
    link_target,
    point_link,
    render_snippet,
    snippet_outdated,
    snippet_path,
    write_snippet,
)
from worker.nbd.main_config import config_from_cmdline
from worker.nbd.probe import parse_listing
from worker.nbd.process import (
    MainProcess,
    ReloadLock,
    check_main_process,
    parse_stat,
    parse_version,
    read_pid_file,
)
from worker.nbd.selftest import SelfTestResult


def test_parse_listing_matches_whole_lines() -> None:
    names = parse_listing("Negotiation: ..\nexport-disk1\nexport-disk10\n\n")
    assert names == {"export-disk1", "export-disk10"}
    assert "export-disk" not in names
    assert parse_listing("Negotiation: ..\n") == frozenset()


def test_parse_stat_handles_odd_command_names() -> None:
    stat_line = "1234 (nbd (server) x) S 1 1234 1234 0 -1 4194560 0 0 0 0 17 5 0 0 20 0"
    stat = parse_stat(stat_line)
    assert (stat.state, stat.ppid, stat.session, stat.cpu_ticks) == ("S", 1, 1234, 22)


def test_parse_stat_reads_group_children_and_start() -> None:
    stat_line = "77 (a) b) R 1 70 71 0 -1 4194560 0 0 0 0 17 5 3 4 20 0 1 0 123456 0 0"
    stat = parse_stat(stat_line)
    assert (stat.pgrp, stat.session, stat.children_cpu_ticks, stat.start_ticks) == (
        70, 71, 7, 123456,
    )  # fmt: skip
    own = parse_stat(Path("/proc/self/stat").read_text())
    assert (own.pgrp, own.session, own.state) == (os.getpgrp(), os.getsid(0), "R")
    assert own.start_ticks > 0
    assert parse_stat(Path(f"/proc/{os.getpid()}/stat").read_text()).start_ticks == own.start_ticks


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["nbd-server"], "/etc/nbd-server/config"),
        (["nbd-server", "-C", "/a/config", "-p", "/run/x.pid"], "/a/config"),
        (["nbd-server", "-C/a/config"], "/a/config"),
        (["nbd-server", "--config-file", "/b"], "/b"),
        (["nbd-server", "--config-file=/c"], "/c"),
        (["nbd-server", "-n", "-C", "/d"], "/d"),
    ],
)
def test_config_from_cmdline(argv: list[str], expected: str) -> None:
    assert config_from_cmdline(argv) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("This is nbd-server version 3.26.1\n", (3, 26, 1)),
        ("This is nbd-server version 3.24", (3, 24, 0)),
        ("junk\nThis is nbd-server version 3.25.2-rc1", (3, 25, 2)),
    ],
)
def test_parse_version(text: str, expected: tuple[int, int, int]) -> None:
    assert parse_version(text) == expected


def test_parse_version_without_a_version() -> None:
    with pytest.raises(ValueError, match="no nbd-server version"):
        parse_version("command not found")


def test_pid_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ServerUnavailable, match="cannot read"):
        read_pid_file(tmp_path / "absent.pid")
    bad = tmp_path / "bad.pid"
    bad.write_text("12ab\n")
    with pytest.raises(ServerUnavailable, match="no valid pid"):
        read_pid_file(bad)
    bad.write_text("0\n")
    with pytest.raises(ServerUnavailable, match="no valid pid"):
        read_pid_file(bad)
    bad.write_text("1\n")
    assert read_pid_file(bad) == 1


def test_init_is_not_taken_for_nbd_server(tmp_path: Path) -> None:
    with pytest.raises(ServerUnavailable):
        check_main_process(1, tmp_path / "config")


def test_this_process_is_not_taken_for_nbd_server(tmp_path: Path) -> None:
    with pytest.raises(ServerUnavailable):
        check_main_process(os.getpid(), tmp_path / "config")


def test_render_snippet_is_a_section_naming_the_link() -> None:
    text = render_snippet(ExportSpec("migration-vm-x-disk0", Path("/links/migration-vm-x-disk0")))
    assert "[migration-vm-x-disk0]\n" in text
    assert "exportname = /links/migration-vm-x-disk0\n" in text


def test_snippets_turn_on_flush_fua_and_trim_and_settings_can_turn_each_off() -> None:
    link = Path("/links/e")
    text = render_snippet(ExportSpec("e", link))
    assert text.splitlines()[-3:] == ["flush = true", "fua = true", "trim = true"]
    off = render_snippet(ExportSpec("e", link, DataPathOptions(flush=True, fua=False, trim=False)))
    assert off.splitlines()[-3:] == ["flush = true", "fua = false", "trim = false"]
    for harmful in ("copyonwrite", "temporary", "filesize", "maxconnections", "sync", "readonly"):
        assert harmful not in text


def test_a_snippet_without_the_options_is_outdated_not_replaced(tmp_path: Path) -> None:
    spec = ExportSpec("e0", tmp_path / "links" / "e0")
    old = f"[e0]\nexportname = {spec.link_path}\n"  # as written before the data-path options
    snippet_path(tmp_path, "e0").write_text(old)
    assert snippet_outdated(tmp_path, spec)
    # Same link, other options: rewritten without asking for a restart (the loaded export
    # keeps serving the right device; only its options wait for a restart).
    assert write_snippet(tmp_path, spec) is SnippetWrite.OPTIONS_CHANGED
    assert not snippet_outdated(tmp_path, spec)
    moved = ExportSpec("e0", tmp_path / "elsewhere" / "e0")
    assert not snippet_outdated(tmp_path, moved)  # another path is not an option


def test_write_snippet_is_atomic_idempotent_and_leaves_no_temp(tmp_path: Path) -> None:
    spec = ExportSpec("e0", tmp_path / "links" / "e0")
    assert write_snippet(tmp_path, spec) is SnippetWrite.CREATED
    assert write_snippet(tmp_path, spec) is SnippetWrite.UNCHANGED
    path = snippet_path(tmp_path, "e0")
    assert path.read_text() == render_snippet(spec)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e0.conf"]
    moved = ExportSpec("e0", tmp_path / "elsewhere" / "e0")
    assert write_snippet(tmp_path, moved) is SnippetWrite.REPLACED
    assert path.read_text() == render_snippet(moved)


def test_point_link_repoints_atomically(tmp_path: Path) -> None:
    link = tmp_path / "e0"
    assert point_link(link, "/dev/vdb") is True
    assert point_link(link, "/dev/vdb") is False
    assert point_link(link, "/dev/vdc") is True
    assert link_target(link) == "/dev/vdc"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e0"]


async def test_reload_lock_serializes_and_times_out(tmp_path: Path) -> None:
    lock = ReloadLock(tmp_path / ".lock")
    other = ReloadLock(tmp_path / ".lock")  # another process's view: only the flock is shared
    async with lock.hold(1):
        with pytest.raises(TimeoutError):
            async with other.hold(0.05):
                pass
        with pytest.raises(TimeoutError):
            async with lock.hold(0.05):
                pass
    async with other.hold(1) as waited:
        assert waited < 1


async def test_reload_lock_waiters_run_in_turn(tmp_path: Path) -> None:
    lock = ReloadLock(tmp_path / ".lock")
    inside = 0
    peak = 0

    async def critical() -> None:
        nonlocal inside, peak
        async with lock.hold(5):
            inside += 1
            peak = max(peak, inside)
            await asyncio.sleep(0.001)
            inside -= 1

    await asyncio.gather(*(critical() for _ in range(10)))
    assert peak == 1


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o000])
def test_a_snippet_has_mode_0644_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    spec = ExportSpec("migration-vm-x-disk0", tmp_path / "link")
    old = os.umask(umask)
    try:
        write_snippet(tmp_path, spec)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "migration-vm-x-disk0.conf").stat().st_mode) == 0o644


async def test_a_pid_is_vetted_once_and_a_failed_self_test_refuses_it(tmp_path: Path) -> None:
    """The gate's bookkeeping (the self-test itself is an integration test): one self-test
    per pid however many callers wait, a failure refused unless the override is set."""
    calls: list[str] = []

    async def failing(binary: str) -> SelfTestResult:
        calls.append(binary)
        await asyncio.sleep(0.01)
        return SelfTestResult(binary, ("a WRITE_ZEROES left old data",))

    pid = os.getpid()
    process = MainProcess(tmp_path / "pid", tmp_path / "conf.d", version_timeout_s=1,
                          self_test=failing)  # fmt: skip
    process._versions = {pid: (3, 26, 1)}  # as read from /proc/PID/exe -V
    results = await asyncio.gather(
        *(process._binary_gates(pid) for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, UnsafeServer) for r in results)
    assert "a WRITE_ZEROES left old data" in str(results[0])
    assert calls == [f"/proc/{pid}/exe"]

    seen: list[bool] = []
    accepting = MainProcess(tmp_path / "pid", tmp_path / "conf.d", version_timeout_s=1,
                            self_test=failing, accept_failed_self_test=True,
                            on_self_test=lambda _pid, result: seen.append(result.ok))  # fmt: skip
    accepting._versions = {pid: (3, 26, 1)}
    version, verdict = await accepting._binary_gates(pid)
    assert version == (3, 26, 1)
    assert verdict is not None
    assert not verdict.ok
    assert seen == [False]


async def test_a_self_test_that_could_not_run_is_not_a_verdict(tmp_path: Path) -> None:
    attempts: list[str] = []

    async def flaky(binary: str) -> SelfTestResult:
        attempts.append(binary)
        if len(attempts) == 1:
            raise ServerUnavailable("a private instance did not start")
        return SelfTestResult(binary, ())

    pid = os.getpid()
    process = MainProcess(tmp_path / "pid", tmp_path / "conf.d", version_timeout_s=1,
                          self_test=flaky)  # fmt: skip
    process._versions = {pid: (3, 26, 1)}
    with pytest.raises(ServerUnavailable):
        await process._binary_gates(pid)
    with pytest.raises(ServerUnavailable):
        await process._binary_gates(pid)  # for a few seconds, jobs get the same reason
    assert len(attempts) == 1
    process._unrun = None  # as when UNRUN_RETRY_S has passed
    _, verdict = await process._binary_gates(pid)  # tried again, not refused for good
    assert verdict is not None
    assert verdict.ok
    assert len(attempts) == 2
