"""One probe gate per NbdServer: however many exports its callers ask about at once, no more
than PROBES_AT_ONCE NBD_OPT_GO handshakes are in flight (issue #23: nbd-server's accept
backlog is 10), a pass that just opened every export asks the canary only, and each
probe's local port is left to connect(). Against stand-in servers on loopback."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from harness.nbd import REP_ERR_POLICY
from worker.errors import ServerUnavailable
from worker.metrics import build_metrics
from worker.nbd.connections import SocketEnds
from worker.nbd.probes import CANARY_ADDRESS_V4, PROBES_AT_ONCE
from worker.nbd.server import NbdServer
from worker.nbd.wire import (
    IHAVEOPT,
    INFO_EXPORT,
    IP_BIND_ADDRESS_NO_PORT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REP_ACK,
    REP_ERR_UNKNOWN,
    REP_INFO,
    UNKNOWN,
    ExportInfo,
    _connect,
    own_probes,
)
from worker.settings import Settings


@dataclass
class Counting:
    """Answers every NBD_OPT_GO with "unknown export" after `hold_s` (`opens`: opens it,
    except for the canary's address, which its authfile would refuse), counting
    connections; from connection `fail_after` on, it hangs up before its greeting."""

    hold_s: float = 0.005
    fail_after: int | None = None
    opens: bool = False
    port: int = 0
    open: int = 0
    most_open: int = 0
    connections: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            if self.fail_after is not None and self.connections > self.fail_after:
                return
            writer.write(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3))
            await reader.readexactly(4)  # the client's flags
            _, option, length = struct.unpack(">QII", await reader.readexactly(16))
            await reader.readexactly(length)
            await asyncio.sleep(self.hold_s)  # so that probes overlap
            writer.write(self._answer(option, writer.get_extra_info("peername")[0]))
            await writer.drain()
            await reader.read()  # until the client hangs up
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            writer.close()

    def _answer(self, option: int, peer: str) -> bytes:
        def reply(kind: int, data: bytes = b"") -> bytes:
            return struct.pack(">QIII", OPTION_REPLY_MAGIC, option, kind, len(data)) + data

        if not self.opens:
            return reply(REP_ERR_UNKNOWN)
        if peer == CANARY_ADDRESS_V4:
            return reply(REP_ERR_POLICY)
        return reply(REP_INFO, struct.pack(">HQH", INFO_EXPORT, 1 << 20, 1)) + reply(REP_ACK)


@pytest.fixture
async def counting() -> AsyncIterator[Counting]:
    fake = Counting()
    server = await asyncio.start_server(fake.handle, "127.0.0.1", 0, backlog=256)
    fake.port = server.sockets[0].getsockname()[1]
    async with server:
        yield fake


def nbd_server(port: int) -> NbdServer:
    settings = Settings(node_id="t", nbd_host="127.0.0.1", nbd_port=port, probe_timeout_s=5)
    return NbdServer(settings, build_metrics("t"))


def names(prefix: str, count: int) -> list[str]:
    return [f"migration-vm-{prefix}-{i}-disk0" for i in range(count)]


async def test_every_caller_shares_one_bound(counting: Counting) -> None:
    server = nbd_server(counting.port)
    known = asyncio.create_task(server.known_names(names("a", 60)))
    states = asyncio.create_task(server.export_states(names("b", 60)))
    unprotected = asyncio.create_task(
        server.unprotected(dict.fromkeys(names("c", 60), ("10.0.0.1",)))
    )
    singles = [server.ping() for _ in range(10)] + [server.knows(n) for n in names("d", 10)]
    await asyncio.gather(known, states, unprotected, *singles)
    assert known.result() == set()
    assert set(states.result().values()) == {UNKNOWN}
    assert set(unprotected.result().values()) == {None}
    assert counting.connections == 60 * 3 + 10 + 10
    # Each batch alone would open PROBES_AT_ONCE, and the single probes one each.
    assert counting.most_open == PROBES_AT_ONCE


async def test_a_failed_probe_ends_its_batch(counting: Counting) -> None:
    counting.fail_after = 20
    server = nbd_server(counting.port)
    with pytest.raises(ServerUnavailable):
        await server.export_states(names("e", 1000))
    await asyncio.sleep(0.1)
    # The lanes still running when the first error came finish their probe, no more.
    assert counting.connections <= 20 + PROBES_AT_ONCE


async def test_a_pass_that_just_opened_each_export_asks_only_the_canary(
    counting: Counting,
) -> None:
    counting.opens = True
    exports = dict.fromkeys(names("f", 40), ("10.0.0.1",))
    server = nbd_server(counting.port)
    started = time.monotonic()
    states = await server.export_states(exports)
    assert all(isinstance(state, ExportInfo) for state in states.values())
    assert await server.unprotected(exports, opened_since=started) == dict.fromkeys(exports, False)
    assert counting.connections == 40 + 40  # the pass, then the canary's probes
    # Without that evidence (or with older evidence), each export is opened again first.
    later = nbd_server(counting.port)
    await later.export_states(exports)
    counting.connections = 0
    verdicts = await later.unprotected(exports, opened_since=time.monotonic())
    assert verdicts == dict.fromkeys(exports, False)
    assert counting.connections == 40 + 40


@pytest.mark.parametrize("loopback", ["127.0.0.1", "::1"])
async def test_a_probe_from_a_source_address_leaves_its_port_to_connect(loopback: str) -> None:
    """bind() with port 0 would never pick a port still in TIME_WAIT from an earlier probe:
    the port is left to connect(), which may, so thousands of probes do not run out."""
    listener = await asyncio.start_server(lambda r, w: w.close(), loopback, 0)
    async with listener:
        port = listener.sockets[0].getsockname()[1]
        sock, ends = await _connect(loopback, port, loopback)
        with sock:
            assert ends.client == (loopback, sock.getsockname()[1])
            assert ends.server == (loopback, port)
            assert sock.getsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT) == 1
            host, local_port = sock.getsockname()[:2]
            assert (host, local_port != 0) == (loopback, True)


@pytest.mark.parametrize("source", [None, "127.0.0.1"])
async def test_a_probe_is_known_as_this_process_s_own_before_the_server_accepts_it(
    source: str | None,
) -> None:
    """The live view samples the server's connections in a thread: a probe must be among
    this process's own (by both ends) from the moment the server can accept it, not only
    once this process has seen its connect() end (then a sample in between counted it as
    a client's connection, one more in connections_total)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    opening = asyncio.ensure_future(_connect("127.0.0.1", port, source))
    try:
        for _ in range(1000):  # the connect's steps, one turn of the loop at a time
            await asyncio.sleep(0)
            try:
                accepted, peer = listener.accept()
            except BlockingIOError:
                continue
            break
        else:
            raise AssertionError("the probe never reached the server")
        with accepted:
            # Its client end as the server sees it, at once, whether or not connect() ended.
            probe = SocketEnds(peer[:2], ("127.0.0.1", port))
            assert probe in own_probes()
        sock, ends = await opening
        sock.close()
        assert ends == probe
    finally:
        listener.close()
        if not opening.done():
            opening.cancel()
