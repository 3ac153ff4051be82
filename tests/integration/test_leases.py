"""Leases, expiry, release modes and generations (worker/expiry.py, the flow's release), on
real RabbitMQ, MariaDB and the project's nbd-server: renewals, an expiry that cuts a held
connection after its grace, the release modes while nbdcopy copies, stale generations, and
a worker killed in the middle of an expiry.

Over 400 lines (budget 560) as one capability's tests (the leases issue's acceptance), with
the helpers they share.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from datetime import datetime
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection, AbstractQueue

from harness.nbd import REP_ACK, NbdConnection, NbdError, NbdServerProcess, go_reply
from harness.processes import pid_running
from harness.worker_process import WorkerProcess
from tests.conftest import Scheduler, job, make_disk, running_worker, scheduler_for, unique
from tests.fault_run import FAULT_SETTINGS
from tests.integration.test_data_path import nbd_uri, same_content
from tests.integration.test_live_view import slow_source, start_copy, used_backing
from worker.settings import Settings

pytestmark = pytest.mark.integration


def lease_settings(settings: Settings) -> Settings:
    """Expiry looked at twice a second, the notice 3 s ahead, a 2 s grace."""
    return settings.model_copy(
        update={
            "live_sample_s": 0.2,
            "expiry_check_s": 0.5,
            "expiry_notice_s": 3.0,
            "expiry_grace_s": 2.0,
        }
    )


async def events_of(settings: Settings, amqp: AbstractConnection) -> AbstractQueue:
    channel = await amqp.channel()
    exchange = await channel.declare_exchange(
        settings.exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(exchange, routing_key=f"event.{settings.node_id}.#")
    return queue


async def wait_for_event(
    queue: AbstractQueue, kind: str, export_name: str, timeout_s: float, seen: list[dict[str, Any]]
) -> dict[str, Any]:
    """The first `kind` event of the export (every event read goes to `seen`)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        message = await queue.get(fail=False, no_ack=True)
        if message is None:
            await asyncio.sleep(0.05)
            continue
        event: dict[str, Any] = json.loads(message.body)
        seen.append(event)
        if event["kind"] == kind and event["export_name"] == export_name:
            return event
    raise AssertionError(f"no {kind} event for {export_name} in {timeout_s} s: {seen}")


def disk_job(reply: dict[str, Any], kind: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": kind,
        "job_id": f"{kind}-{reply['generation']}-{len(extra)}-{id(extra)}",
        "vm_id": reply["vm_id"],
        "disk_unit_number": reply["disk_unit_number"],
        **extra,
    }


async def test_a_lease_with_no_copy_expires_fenced_flushed_released_and_said(
    settings: Settings, amqp: AbstractConnection, nbd_server: NbdServerProcess, disks_dir: Path
) -> None:
    live = lease_settings(settings)
    queue = await events_of(live, amqp)
    async with running_worker(live):
        scheduler = await scheduler_for(amqp, live)
        ready = await scheduler.request(job(device=make_disk(disks_dir, "l"), lease_s=5))
        assert ready["status"] == "ready", ready
        assert ready["lease_expires_at"] is not None
        name = ready["export_name"]
        started = asyncio.get_running_loop().time()
        seen: list[dict[str, Any]] = []
        expiring = await wait_for_event(queue, "expiring", name, 15, seen)
        expired = await wait_for_event(queue, "expired", name, 15, seen)
        took = asyncio.get_running_loop().time() - started
        assert took <= 15, took
        assert expiring["seq"] < expired["seq"]
        assert (expired["reason"], expired["forced"], expired["cut"]) == ("lease", False, 0)
        assert expired["generation"] == ready["generation"]

        status = await scheduler.request(disk_job(ready, "inspect-export"))
        assert status["export_status"] == "released", status
        authfile = (live.auth_dir / f"{name}.allow").read_text().splitlines()
        assert [line for line in authfile if not line.startswith("#")] == []
        assert not (live.link_dir / name).exists()
        assert not (live.nbd_conf_dir / f"{name}.conf").exists()
        with pytest.raises(NbdError):
            NbdConnection(nbd_server.port, name)
        await scheduler.channel.close()
    await queue.channel.close()


# -- helpers of the tests below -------------------------------------------------------------

MIB = 1 << 20
#: The lease of the tests below (the contract's least), and its grace (lease_settings).
LEASE_S = 5
GRACE_S = 2.0


def a_job(reply: dict[str, Any], kind: str, **extra: Any) -> dict[str, Any]:
    """A job of `kind` for the export of `reply`, under a job_id of its own."""
    return {
        "type": kind,
        "job_id": unique(kind),
        "vm_id": reply["vm_id"],
        "disk_unit_number": reply["disk_unit_number"],
        **extra,
    }


async def answer(scheduler: Scheduler, body: dict[str, Any], status: str) -> dict[str, Any]:
    reply = await scheduler.request(body)
    assert reply["status"] == status, reply
    return reply


async def refused(scheduler: Scheduler, body: dict[str, Any], code: str) -> dict[str, Any]:
    reply = await scheduler.request(body)
    assert (reply["status"], reply.get("error", {}).get("code")) == ("error", code), reply
    return dict(reply["error"])


async def inspect(scheduler: Scheduler, reply: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return await answer(scheduler, a_job(reply, "inspect-export", **extra), "inspected")


def when(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


async def read(conn: NbdConnection, length: int) -> bytes:
    """A read off the event loop (the worker under test runs on it)."""
    return await asyncio.to_thread(conn.read, 0, length)


async def opens(port: int, name: str) -> bool:
    """Whether a new client's NBD_OPT_GO for `name` opens it now."""
    return await asyncio.to_thread(go_reply, port, name) == REP_ACK


async def until_refused(port: int, name: str, timeout_s: float) -> float:
    """When (loop time) a new connection to `name` was first refused: it is fenced."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while await opens(port, name):
        assert loop.time() < deadline, f"{name} still admits new connections"
        await asyncio.sleep(0.05)
    return loop.time()


async def until_cut(conn: NbdConnection, length: int, expected: bytes, timeout_s: float) -> float:
    """When (loop time) a read on `conn` first failed; every read before gave `expected`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            data = await read(conn, length)
        except (NbdError, OSError):
            return loop.time()
        assert data == expected
        assert loop.time() < deadline, "the connection was never cut"
        await asyncio.sleep(0.1)


async def events_until_quiet(
    queue: AbstractQueue, export_name: str, kind: str, timeout_s: float, quiet_s: float
) -> list[bytes]:
    """The raw bodies of the export's `kind` events: waits up to `timeout_s` for the first,
    then `quiet_s` more for any repeat."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    bodies: list[bytes] = []
    while loop.time() < deadline:
        message = await queue.get(fail=False, no_ack=True)
        if message is None:
            await asyncio.sleep(0.05)
            continue
        event = json.loads(message.body)
        if (event["kind"], event["export_name"]) == (kind, export_name):
            if not bodies:
                deadline = loop.time() + quiet_s
            bodies.append(message.body)
    return bodies


def assert_released(live: Settings, nbd_server: NbdServerProcess, name: str) -> None:
    """The export's files are gone and the server opens it for nobody."""
    authfile = (live.auth_dir / f"{name}.allow").read_text().splitlines()
    assert [line for line in authfile if not line.startswith("#")] == []
    assert not (live.link_dir / name).exists()
    assert not (live.nbd_conf_dir / f"{name}.conf").exists()
    assert go_reply(nbd_server.port, name) != REP_ACK


# -- renewals -------------------------------------------------------------------------------


@pytest.mark.slow  # three lease lengths renewed, then one more to expire: about 22 s
async def test_a_lease_renewed_by_reuse_and_by_inspect_stays_then_expires_once_left(
    settings: Settings, amqp: AbstractConnection, nbd_server: NbdServerProcess, disks_dir: Path
) -> None:
    """A 5 s lease renewed every 1.5 s, by a prepare-export of the same disk (a reuse) and
    an inspect-export with renew in turn, stays active for three lease lengths, its
    lease_expires_at moving on at every renewal; left alone, it expires within 10 s."""
    live = lease_settings(settings)
    queue = await events_of(live, amqp)
    loop = asyncio.get_running_loop()
    async with running_worker(live):
        scheduler = await scheduler_for(amqp, live)
        request = job(device=make_disk(disks_dir, "renewed"), lease_s=LEASE_S)
        ready = await answer(scheduler, request, "ready")
        name, generation = ready["export_name"], ready["generation"]
        started = loop.time()
        expiries = [when(ready["lease_expires_at"])]
        renewal = 0
        while loop.time() - started < 3 * LEASE_S:
            renewal += 1
            await asyncio.sleep(max(0.0, started + 1.5 * renewal - loop.time()))
            if renewal % 2:
                reply = await answer(scheduler, {**request, "job_id": unique("reuse")}, "ready")
                assert (reply["action"], reply["generation"]) == ("reused", generation + 1)
                generation = reply["generation"]
            else:
                reply = await inspect(scheduler, ready, renew=True)
                assert (reply["export_status"], reply["fenced"]) == ("active", False), reply
                assert reply["generation"] == generation
            expiries.append(when(reply["lease_expires_at"]))
            assert expiries[-1] > expiries[-2], expiries
        status = await inspect(scheduler, ready)
        assert (status["export_status"], status["fenced"]) == ("active", False), status
        assert when(status["lease_expires_at"]) == expiries[-1]
        assert (expiries[-1] - expiries[0]).total_seconds() >= 2 * LEASE_S, expiries
        assert await opens(nbd_server.port, name)
        seen: list[dict[str, Any]] = []
        while (message := await queue.get(fail=False, no_ack=True)) is not None:
            seen.append(json.loads(message.body))
        assert [e for e in seen if e["kind"] == "expired"] == [], seen

        left = loop.time()
        expired = await wait_for_event(queue, "expired", name, 10, seen)
        assert loop.time() - left <= 10
        assert expired["generation"] == generation
        assert when(expired["lease_expires_at"]) == expiries[-1]
        assert (expired["reason"], expired["forced"], expired["cut"]) == ("lease", False, 0)
        assert (await inspect(scheduler, ready))["export_status"] == "released"
        assert_released(live, nbd_server, name)
        await scheduler.channel.close()
    await queue.channel.close()


# -- an expiry with a connection held -------------------------------------------------------


async def test_an_expiry_fences_then_after_the_grace_cuts_only_the_held_connection(
    settings: Settings, amqp: AbstractConnection, nbd_server: NbdServerProcess, disks_dir: Path
) -> None:
    """Once fenced, new connections are refused at once while the held one still reads;
    after the grace that connection, and no other, is cut: a connection to another export
    (no lease) reads on, nbd-server's main process is the same; `expired` says forced, cut 1,
    and the export is released."""
    live = lease_settings(settings)
    queue = await events_of(live, amqp)
    main_pid = int(nbd_server.pid_file.read_text())
    leased_bytes, other_bytes = b"bytes of the leased export", b"bytes of the other export"
    async with running_worker(live):
        scheduler = await scheduler_for(amqp, live)
        other = await answer(
            scheduler, job(device=make_disk(disks_dir, "other", other_bytes)), "ready"
        )
        ready = await answer(
            scheduler,
            job(device=make_disk(disks_dir, "leased", leased_bytes), lease_s=LEASE_S),
            "ready",
        )
        name = ready["export_name"]
        held = await asyncio.to_thread(NbdConnection, nbd_server.port, name)
        kept = await asyncio.to_thread(NbdConnection, nbd_server.port, other["export_name"])
        try:
            assert await read(held, len(leased_bytes)) == leased_bytes
            assert await read(kept, len(other_bytes)) == other_bytes
            fenced_at = await until_refused(nbd_server.port, name, LEASE_S + 5)
            assert await read(held, len(leased_bytes)) == leased_bytes
            assert not await opens(nbd_server.port, name)
            status = await inspect(scheduler, ready)
            assert (status["export_status"], status["fenced"]) == ("active", True), status
            assert len(status["live"]["connections"]) == 1, status

            cut_at = await until_cut(held, len(leased_bytes), leased_bytes, GRACE_S + 5)
            # The grace counts from the fence, which came a poll (0.05 s) and an authfile write
            # before it was seen here.
            assert cut_at - fenced_at >= GRACE_S - 0.5, cut_at - fenced_at
            assert await read(kept, len(other_bytes)) == other_bytes
        finally:
            held.close()
        seen: list[dict[str, Any]] = []
        expired = await wait_for_event(queue, "expired", name, 10, seen)
        assert (expired["reason"], expired["forced"], expired["cut"]) == ("lease", True, 1)
        assert expired["generation"] == ready["generation"]
        assert (await inspect(scheduler, ready))["export_status"] == "released"
        assert_released(live, nbd_server, name)

        try:
            assert await read(kept, len(other_bytes)) == other_bytes
        finally:
            kept.close()
        status = await inspect(scheduler, other)
        assert (status["export_status"], status["fenced"]) == ("active", False), status
        assert int(nbd_server.pid_file.read_text()) == main_pid
        assert pid_running(main_pid)
        await scheduler.channel.close()
    await queue.channel.close()


# -- release modes while nbdcopy copies -----------------------------------------------------

#: The copy's data, and the rate that makes it last about 4 s (6 s of data, less the rate
#: filter's default burst of 2 s).
COPY_BYTES = 48 * MIB
COPY_RATE = str(COPY_BYTES * 8 // 6)
COPY_CONNECTIONS = 4


async def copying(
    scheduler: Scheduler, ready: dict[str, Any], copy: asyncio.subprocess.Process
) -> list[dict[str, Any]]:
    """The copy's connections, once inspect-export sees all of them open."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while True:
        assert copy.returncode is None, "the copy ended before it was seen"
        assert loop.time() < deadline, "the copy's connections were never seen"
        connections: list[dict[str, Any]] = (await inspect(scheduler, ready))["live"]["connections"]
        if len(connections) == COPY_CONNECTIONS:
            return connections
        await asyncio.sleep(0.1)


async def ended(copy: asyncio.subprocess.Process, timeout_s: float = 30) -> tuple[int, str]:
    _, stderr = await asyncio.wait_for(copy.communicate(), timeout_s)
    assert copy.returncode is not None
    return copy.returncode, stderr.decode(errors="replace")


@pytest.mark.parametrize("mode", ["safe", "drain", "force"])
async def test_a_release_while_nbdcopy_copies(
    mode: str,
    settings: Settings,
    amqp: AbstractConnection,
    nbd_server: NbdServerProcess,
    disks_dir: Path,
    tmp_path: Path,
) -> None:
    """safe: export_in_use listing the copy's connections, nothing changed, and the copy
    ends byte-identical; drain: fenced at once, released once the copy ended, byte-identical;
    force: the copy's connections cut (nbdcopy fails), released, nbd-server's main process
    the same."""
    image = tmp_path / "source.img"
    image.write_bytes(os.urandom(COPY_BYTES))
    volume = used_backing(disks_dir / "volume", COPY_BYTES)
    main_pid = int(nbd_server.pid_file.read_text())
    live = lease_settings(settings)
    loop = asyncio.get_running_loop()
    async with running_worker(live):
        scheduler = await scheduler_for(amqp, live)
        ready = await answer(scheduler, job(device=volume), "ready")
        name = ready["export_name"]
        with slow_source(image, tmp_path / "src.sock", COPY_RATE) as source:
            copy = await start_copy(source, nbd_uri(ready), COPY_CONNECTIONS)
            try:
                connections = await copying(scheduler, ready, copy)
                release = a_job(ready, "release-export", mode=mode, wait_s=60)
                if mode == "safe":
                    error = await refused(scheduler, release, "export_in_use")
                    assert copy.returncode is None, "refused only once the copy had ended"
                    ports = {c["client_port"] for c in error["connections"]}
                    assert ports == {c["client_port"] for c in connections}, error
                    status = await inspect(scheduler, ready)
                    assert (status["export_status"], status["fenced"]) == ("active", False)
                    assert await opens(nbd_server.port, name)
                    returncode, stderr = await ended(copy)
                    assert returncode == 0, stderr
                    assert same_content(image, volume)
                    released = await answer(scheduler, a_job(ready, "release-export"), "released")
                    assert (released["was_active"], released["cut"]) == (True, 0)
                elif mode == "drain":
                    corr = await scheduler.publish(release)
                    await until_refused(nbd_server.port, name, 5)
                    assert copy.returncode is None, "fenced only once the copy had ended"
                    released = await scheduler.reply(corr, 60)
                    replied_at = loop.time()
                    returncode, stderr = await ended(copy, 5)
                    ended_at = loop.time()
                    assert returncode == 0, stderr
                    # Released once the copy's connections had ended: nbdcopy exits just
                    # after it closes them, so within the reply's round trip of it.
                    assert ended_at - replied_at <= 1.0, ended_at - replied_at
                    assert same_content(image, volume)
                    assert (released["status"], released["cut"]) == ("released", 0), released
                else:
                    released = await answer(scheduler, release, "released")
                    returncode, stderr = await ended(copy, 10)
                    assert returncode != 0, "nbdcopy finished although its copy was cut"
                    assert 1 <= released["cut"] <= COPY_CONNECTIONS, released
                    print(f"force: cut {released['cut']}; nbdcopy: {stderr.strip()[-200:]}")
            finally:
                if copy.returncode is None:
                    copy.kill()
                    await copy.wait()
        assert (released["mode"], released["flushed"]) == (mode, True), released
        assert (await inspect(scheduler, ready))["export_status"] == "released"
        assert_released(live, nbd_server, name)
        assert int(nbd_server.pid_file.read_text()) == main_pid
        assert pid_running(main_pid)
        await scheduler.channel.close()


# -- generations ----------------------------------------------------------------------------


async def test_a_stale_generation_is_refused_for_flush_and_release_and_changes_nothing(
    settings: Settings, amqp: AbstractConnection, nbd_server: NbdServerProcess, disks_dir: Path
) -> None:
    """Prepared twice (generations g, g+1): a flush and a release naming g answer
    stale_generation, the export active, its lease not renewed; naming g+1 they work."""
    async with running_worker(settings):
        scheduler = await scheduler_for(amqp, settings)
        request = job(device=make_disk(disks_dir, "gen"), lease_s=600)
        first = await answer(scheduler, request, "ready")
        second = await answer(scheduler, {**request, "job_id": unique("again")}, "ready")
        old, current = first["generation"], second["generation"]
        assert current == old + 1
        name = second["export_name"]

        async def unchanged() -> None:
            status = await inspect(scheduler, second)
            assert (status["export_status"], status["fenced"]) == ("active", False), status
            assert status["generation"] == current
            assert status["lease_expires_at"] == second["lease_expires_at"], status
            assert await opens(nbd_server.port, name)

        # The database keeps lease_expires_at to the microsecond: a renewal would move it.
        error = await refused(
            scheduler, a_job(second, "flush-export", generation=old), "stale_generation"
        )
        assert str(old) in error["message"], error
        await unchanged()
        await refused(
            scheduler,
            a_job(second, "release-export", generation=old, mode="force"),
            "stale_generation",
        )
        await unchanged()

        await answer(scheduler, a_job(second, "flush-export", generation=current), "flushed")
        released = await answer(
            scheduler, a_job(second, "release-export", generation=current), "released"
        )
        assert (released["was_active"], released["flushed"]) == (True, True), released
        assert (await inspect(scheduler, second))["export_status"] == "released"
        assert_released(settings, nbd_server, name)
        await scheduler.channel.close()


# -- a worker killed during an expiry -------------------------------------------------------


async def test_a_worker_killed_during_an_expiry_is_finished_by_the_next_one(
    settings: Settings, amqp: AbstractConnection, nbd_server: NbdServerProcess, disks_dir: Path
) -> None:
    """A worker process SIGKILLed by the expiry's release just before its record (the
    export released, its expired event written but not yet ready); started again without
    the crash point, the next one finishes the expiry: released, not fenced-but-active, and
    exactly one distinct `expired` event (a repeat would be byte-identical)."""
    live = lease_settings(settings).model_copy(update=FAULT_SETTINGS)
    queue = await events_of(live, amqp)  # bound before any worker runs
    scheduler = await scheduler_for(amqp, live)
    doomed = WorkerProcess(live, EXPORT_WORKER_CRASH_AT="release_before_record")
    try:
        await doomed.start()
        ready = await answer(
            scheduler, job(device=make_disk(disks_dir, "killed"), lease_s=LEASE_S), "ready"
        )
        name = ready["export_name"]
        assert await doomed.wait(LEASE_S + 20) == -signal.SIGKILL, "".join(doomed.log)[-2000:]
        early = []
        while (message := await queue.get(fail=False, no_ack=True)) is not None:
            early.append(json.loads(message.body))
        assert [e for e in early if e["kind"] == "expired"] == [], early

        async with running_worker(live):
            bodies = await events_until_quiet(queue, name, "expired", 15, quiet_s=3)
            assert bodies, "no expired event after the restart"
            assert len(set(bodies)) == 1, bodies
            expired = json.loads(bodies[0])
            assert (expired["reason"], expired["forced"], expired["cut"]) == ("lease", False, 0)
            assert expired["generation"] == ready["generation"]
            status = await inspect(scheduler, ready)
            assert (status["export_status"], status["fenced"]) == ("released", False), status
            assert_released(live, nbd_server, name)
    finally:
        await doomed.stop()
        await scheduler.channel.close()
        await queue.channel.close()
