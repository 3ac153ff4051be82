"""A native asyncio NBD client for probes: list exports, and open one with NBD_OPT_GO.

`nbd-client -l` costs a process and ~45-50 ms per call (Nagle on the server, delayed ACK on
the client); this handshake with TCP_NODELAY and TCP_QUICKACK takes ~1 ms, and GO is the
only way to know an export is servable (listed is not servable: nbd-server-facts.md).
All integers are big-endian; the constants are the protocol's.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator
from typing import Final, Literal

from worker.errors import ProbeTimeout, ServerUnavailable

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
OPT_ABORT = 2
OPT_LIST = 3
OPT_GO = 7
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERROR_BIT = 0x80000000
INFO_EXPORT = 0
CMD_DISC = 2


class _Session:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._sock = writer.get_extra_info("socket")

    def quickack(self) -> None:
        # The kernel drops out of quick-ACK mode by itself, so this is re-armed before each
        # read: otherwise the server's Nagle waits ~40 ms for our delayed ACK between the
        # small replies of a listing.
        if self._sock is not None:
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)

    async def handshake(self) -> None:
        self.quickack()
        magic, opt_magic, flags = struct.unpack(">QQH", await self.reader.readexactly(18))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT or not flags & FLAG_FIXED_NEWSTYLE:
            raise ServerUnavailable("the server does not speak fixed-newstyle NBD")
        self.writer.write(struct.pack(">I", FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES)))

    def send_option(self, option: int, data: bytes = b"") -> None:
        self.writer.write(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)

    async def read_reply(self) -> tuple[int, bytes]:
        self.quickack()
        magic, _option, reply_type, length = struct.unpack(
            ">QIII", await self.reader.readexactly(20)
        )
        if magic != OPTION_REPLY_MAGIC:
            raise ServerUnavailable("bad NBD option reply")
        return reply_type, await self.reader.readexactly(length)


async def _open(host: str, port: int) -> _Session:
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        raise ServerUnavailable(f"cannot connect to nbd-server at {host}:{port}: {exc}") from exc
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return _Session(reader, writer)


async def _close(session: _Session) -> None:
    session.writer.close()
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        await session.writer.wait_closed()


@contextlib.asynccontextmanager
async def _session(host: str, port: int, timeout_s: float, what: str) -> AsyncIterator[_Session]:
    """A handshaken session, closed on exit, the whole exchange under one deadline.

    Raises ProbeTimeout at the deadline and ServerUnavailable when the server is away or
    drops the connection."""
    try:
        async with asyncio.timeout(timeout_s):
            session = await _open(host, port)
            try:
                await session.handshake()
                yield session
            finally:
                await _close(session)
    except TimeoutError:
        raise ProbeTimeout(
            f"nbd-server at {host}:{port} did not answer {what} within {timeout_s:g} s"
        ) from None
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise ServerUnavailable(f"nbd-server at {host}:{port} closed the connection") from exc


async def list_exports_native(host: str, port: int, timeout_s: float) -> frozenset[str]:
    """Export names the server lists (NBD_OPT_LIST). Raises ServerUnavailable/ProbeTimeout."""
    async with _session(host, port, timeout_s, "a listing") as session:
        session.send_option(OPT_LIST)
        names = set()
        while True:
            reply_type, data = await session.read_reply()
            if reply_type == REP_ACK:
                break
            if reply_type & REP_ERROR_BIT:
                raise ServerUnavailable(
                    f"nbd-server at {host}:{port} refused to list exports "
                    "(is allowlist = true set in [generic]?)"
                )
            if reply_type == REP_SERVER:
                (length,) = struct.unpack(">I", data[:4])
                names.add(data[4 : 4 + length].decode(errors="replace"))
        session.send_option(OPT_ABORT)
        await session.writer.drain()
        return frozenset(names)


#: What NBD_OPT_GO said of an export: its size when it opened, else why not.
#: The server does not know the name (not loaded yet, or never configured).
UNKNOWN: Final = "unknown"
#: The server knows the name but would not serve it (its file or device cannot be opened).
REFUSED: Final = "refused"
ExportState = int | Literal["unknown", "refused"]

REP_ERR_UNKNOWN = 0x80000006


async def export_state(host: str, port: int, name: str, timeout_s: float) -> ExportState:
    """Opens `name` with NBD_OPT_GO, as a real client would, and disconnects at once.

    One short connection whatever the number of exports, unlike a listing that carries
    every name. Raises ServerUnavailable/ProbeTimeout when the server is away or hung.
    """
    encoded = name.encode()
    async with _session(host, port, timeout_s, f"opening {name}") as session:
        data = struct.pack(">I", len(encoded)) + encoded + struct.pack(">H", 0)
        session.send_option(OPT_GO, data)
        size: int | None = None
        while True:
            try:
                reply_type, payload = await session.read_reply()
            except asyncio.IncompleteReadError:
                # The per-connection child gave up opening the export and exited.
                return REFUSED
            if reply_type == REP_ERR_UNKNOWN:
                return UNKNOWN
            if reply_type & REP_ERROR_BIT:
                return REFUSED
            if reply_type == REP_INFO and len(payload) >= 12:
                (info_type,) = struct.unpack(">H", payload[:2])
                if info_type == INFO_EXPORT:
                    (size,) = struct.unpack(">Q", payload[2:10])
            if reply_type == REP_ACK:
                break
        session.writer.write(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
        await session.writer.drain()
        return REFUSED if size is None else size
