"""A native asyncio NBD client: open an export with NBD_OPT_GO, and (for the data-path
self-test) read, write, zero, flush and trim through it.

`nbd-client -l` costs a process and ~45-50 ms per call (Nagle on the server, delayed ACK on
the client); this handshake with TCP_NODELAY and TCP_QUICKACK takes ~1 ms, and GO is the
only way to know an export is servable (known is not servable: nbd-server-facts.md) and
what it offers a copy tool (its transmission flags). Simple replies only: structured
replies are never negotiated. All integers are big-endian; the constants are the protocol's.

Over 400 lines (budget 510) on purpose: the client, the probes and the registry of this
process's own probe connections (which the live view leaves out) share the session code.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final, Literal

from worker.errors import ProbeTimeout, ServerUnavailable
from worker.nbd.connections import SocketEnds

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
OPT_ABORT = 2
OPT_STARTTLS = 5
OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
REP_ERROR_BIT = 0x80000000
INFO_EXPORT = 0
SIMPLE_REPLY_MAGIC = 0x67446698
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6
CMD_FLAG_FUA = 1

# Transmission flags (NBD_INFO_EXPORT): what the export offers a client.
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_CAN_MULTI_CONN = 1 << 8


@dataclass(frozen=True)
class DataPathFlags:
    """An export's transmission flags, named as `nbdinfo --json` names them."""

    raw: int

    @property
    def read_only(self) -> bool:
        return bool(self.raw & FLAG_READ_ONLY)

    @property
    def can_flush(self) -> bool:
        return bool(self.raw & FLAG_SEND_FLUSH)

    @property
    def can_fua(self) -> bool:
        return bool(self.raw & FLAG_SEND_FUA)

    @property
    def can_trim(self) -> bool:
        return bool(self.raw & FLAG_SEND_TRIM)

    @property
    def can_zero(self) -> bool:
        return bool(self.raw & FLAG_SEND_WRITE_ZEROES)

    @property
    def can_multi_conn(self) -> bool:
        return bool(self.raw & FLAG_CAN_MULTI_CONN)

    def as_dict(self) -> dict[str, bool]:
        return {
            "read_only": self.read_only,
            "can_flush": self.can_flush,
            "can_fua": self.can_fua,
            "can_trim": self.can_trim,
            "can_zero": self.can_zero,
            "can_multi_conn": self.can_multi_conn,
        }


@dataclass(frozen=True)
class ExportInfo:
    """What NBD_OPT_GO said of an export that opened."""

    size: int
    flags: DataPathFlags


@dataclass(frozen=True)
class NbdTls:
    """STARTTLS for a session: the client context (CA, client certificate) and the name
    the server's certificate must carry."""

    context: ssl.SSLContext
    server_name: str


class _Session:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        ends: SocketEnds | None = None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        #: The probe's socket as the server's side names it (client: this end).
        self.ends = ends
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

    async def start_tls(self, tls: NbdTls) -> None:
        """NBD_OPT_STARTTLS, then the TLS handshake: every later byte is encrypted. A
        server that will not is refused, never talked to in clear."""
        self.send_option(OPT_STARTTLS)
        reply_type, _ = await self.read_reply()
        if reply_type != REP_ACK:
            raise ServerUnavailable(
                f"nbd-server refused STARTTLS (reply {reply_type:#x}): its [generic] section "
                "needs certfile, keyfile and cacertfile"
            )
        # Bytes already after the plaintext ACK did not come through TLS: someone on the
        # path injected them, to be read later as if they had (the STARTTLS injection).
        if getattr(self.reader, "_buffer", b""):
            raise ServerUnavailable("nbd-server sent data after its STARTTLS answer: refused")
        try:
            await self.writer.start_tls(tls.context, server_hostname=tls.server_name)
        except ssl.SSLError as exc:
            raise ServerUnavailable(f"TLS with nbd-server failed: {exc}") from exc

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


#: Linux's IP_BIND_ADDRESS_NO_PORT (Python's socket module names it from 3.12 only).
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


#: This process's probe connections by both their ends: open (None) or when they closed.
#: The live view leaves them out (a probe's NBD_OPT_GO opens the device in its child, which
#: may outlive the probe by a moment). Both ends, not the local port alone: the kernel
#: draws ports for each destination from its own sequence, so a client of one server
#: often gets the port a probe to another server (another test's, in one test process)
#: closed a moment ago, and was then not counted.
_OWN_PROBES: dict[SocketEnds, float | None] = {}
#: How long after it closed a probe is still recognised as its own.
OWN_PROBE_AFTER_CLOSE_S = 10.0


def own_probes() -> frozenset[SocketEnds]:
    """The ends of this process's probes, open or closed within the last seconds, as the
    server's side names them (an IPv4-mapped address as IPv4, as /proc/net/tcp6 is read)."""
    now = time.monotonic()
    for ends, closed in list(_OWN_PROBES.items()):
        if closed is not None and now - closed > OWN_PROBE_AFTER_CLOSE_S:
            del _OWN_PROBES[ends]
    return frozenset(_OWN_PROBES)


async def _connect(host: str, port: int, source: str | None) -> tuple[socket.socket, SocketEnds]:
    """A socket connected to host:port (from the local address `source`, if given), its ends
    recorded among this process's probes as soon as connect() has chosen its local port,
    before the server can accept it: the live view samples in a thread, and a probe recorded
    only once connected was seen in that gap as a client's connection. With a `source`, the
    local port is left to connect(), chosen for the whole address pair: bind() with port 0
    would pick it alone, never reusing one still in TIME_WAIT from an earlier probe, so a
    few thousand probes a minute (status with 2,000 exports) would run out of ports."""
    loop = asyncio.get_running_loop()
    try:  # an address needs no resolver (and no thread for one)
        addresses: list[tuple[int, tuple[Any, ...]]] = [(_family(host), (host, port))]
    except ValueError:
        wanted = socket.AF_UNSPEC if source is None else _family(source)
        infos = await loop.getaddrinfo(host, port, family=wanted, type=socket.SOCK_STREAM)
        addresses = [(info[0], info[4]) for info in infos]
    error = OSError(f"no address for {host}")
    for family, address in addresses:
        try:
            return await _connect_to(loop, family, address, source)
        except OSError as exc:
            error = exc
    raise error


async def _connect_to(
    loop: asyncio.AbstractEventLoop, family: int, address: tuple[Any, ...], source: str | None
) -> tuple[socket.socket, SocketEnds]:
    """_connect() to one address. Raises OSError."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    ends: SocketEnds | None = None
    try:
        if source is not None:
            with contextlib.suppress(OSError):  # not Linux: bind() picks the port
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
        sock.setblocking(False)
        try:
            sock.connect(address)
            pending = False
        except BlockingIOError:  # in progress: its local port is chosen already
            pending = True
        ends = SocketEnds(_endpoint(sock.getsockname()), _endpoint(address))
        _OWN_PROBES[ends] = None
        if pending:
            await _writable(loop, sock)
            _raise_connect_error(sock)
    except BaseException:
        sock.close()
        if ends is not None:
            _OWN_PROBES[ends] = time.monotonic()  # closed
        raise
    return sock, ends


def _raise_connect_error(sock: socket.socket) -> None:
    """Raises how a non-blocking connect() of `sock` ended, if it failed."""
    if code := sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
        raise OSError(code, os.strerror(code))


def _family(address: str) -> socket.AddressFamily:
    """The family of a numeric address; ValueError for a name."""
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


async def _writable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Returns once `sock` is writable: its connect() has ended, one way or the other."""
    done: asyncio.Future[None] = loop.create_future()

    def ended() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_writer(sock.fileno(), ended)
    try:
        await done
    finally:
        loop.remove_writer(sock.fileno())


async def _open(host: str, port: int, source: str | None) -> _Session:
    # `source`: the address authfiles admit the worker's probes from.
    try:
        sock, ends = await _connect(host, port, source)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            reader, writer = await asyncio.open_connection(sock=sock)
        except BaseException:
            sock.close()
            _OWN_PROBES[ends] = time.monotonic()  # closed
            raise
    except OSError as exc:
        raise ServerUnavailable(f"cannot connect to nbd-server at {host}:{port}: {exc}") from exc
    return _Session(reader, writer, ends)


def _endpoint(sockname: tuple[Any, ...]) -> tuple[str, int]:
    address = ipaddress.ip_address(sockname[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address), int(sockname[1])


#: How long a close waits for the server's side of it (a TLS close_notify answered).
CLOSE_WAIT_S = 2.0


async def _close(session: _Session) -> None:
    if session.ends is not None:
        _OWN_PROBES[session.ends] = time.monotonic()
    session.writer.close()
    # Bounded: a TLS shutdown waits for the peer's close_notify, which a hung server (or
    # one that busy-loops on our close) never sends. wait() neither raises nor cancels.
    closing = asyncio.ensure_future(session.writer.wait_closed())
    try:
        await asyncio.wait([closing], timeout=CLOSE_WAIT_S)
    finally:
        if closing.done():
            with contextlib.suppress(OSError, asyncio.IncompleteReadError, ssl.SSLError):
                closing.result()
        else:  # timed out, or we are cancelled: drop the connection, leave nothing behind
            session.writer.transport.abort()
            closing.cancel()


@contextlib.asynccontextmanager
async def _session(
    host: str,
    port: int,
    timeout_s: float,
    what: str,
    source: str | None = None,
    tls: NbdTls | None = None,
) -> AsyncIterator[_Session]:
    """A handshaken session (over TLS when `tls` is given), closed on exit, the whole
    exchange under one deadline.

    Raises ProbeTimeout at the deadline and ServerUnavailable when the server is away,
    drops the connection or fails TLS."""
    try:
        async with asyncio.timeout(timeout_s):
            session = await _open(host, port, source)
            try:
                await session.handshake()
                if tls is not None:
                    await session.start_tls(tls)
                yield session
            finally:
                await _close(session)
    except TimeoutError:
        raise ProbeTimeout(
            f"nbd-server at {host}:{port} did not answer {what} within {timeout_s:g} s"
        ) from None
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise ServerUnavailable(f"nbd-server at {host}:{port} closed the connection") from exc
    except ssl.SSLError as exc:
        raise ServerUnavailable(f"TLS with nbd-server at {host}:{port} failed: {exc}") from exc


#: What NBD_OPT_GO said of an export: its size and flags when it opened, else why not.
#: The server does not know the name (not loaded yet, or never configured).
UNKNOWN: Final = "unknown"
#: The server knows the name but would not serve it (its file or device cannot be opened).
REFUSED: Final = "refused"
#: The export serves TLS clients only (`force_tls`), and this session is plain.
TLS_REQUIRED: Final = "tls-required"
ExportState = ExportInfo | Literal["unknown", "refused", "tls-required"]

REP_ERR_TLS_REQD = 0x80000005
REP_ERR_UNKNOWN = 0x80000006


async def _go(session: _Session, name: str) -> ExportState:
    """NBD_OPT_GO on `name`; after an ExportInfo the session is in transmission."""
    encoded = name.encode()
    data = struct.pack(">I", len(encoded)) + encoded + struct.pack(">H", 0)
    session.send_option(OPT_GO, data)
    info: ExportInfo | None = None
    while True:
        try:
            reply_type, payload = await session.read_reply()
        except asyncio.IncompleteReadError:
            # The per-connection child gave up opening the export and exited.
            return REFUSED
        if reply_type == REP_ERR_UNKNOWN:
            return UNKNOWN
        if reply_type == REP_ERR_TLS_REQD:
            return TLS_REQUIRED
        if reply_type & REP_ERROR_BIT:
            return REFUSED
        if reply_type == REP_INFO and len(payload) >= 12:
            (info_type,) = struct.unpack(">H", payload[:2])
            if info_type == INFO_EXPORT:
                size, flags = struct.unpack(">QH", payload[2:12])
                info = ExportInfo(size, DataPathFlags(flags))
        if reply_type == REP_ACK:
            return REFUSED if info is None else info


def _disconnect(session: _Session) -> None:
    session.writer.write(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))


async def export_state(
    host: str,
    port: int,
    name: str,
    timeout_s: float,
    *,
    source: str | None = None,
    tls: NbdTls | None = None,
) -> ExportState:
    """Opens `name` with NBD_OPT_GO, as a real client would, from the local address
    `source` if given, and disconnects at once.

    One short connection whatever the number of exports, unlike a listing that carries
    every name, and it works with `allowlist = false`. REFUSED also when the export's
    authfile does not admit `source`. Raises ServerUnavailable/ProbeTimeout when the server
    is away or hung.
    """
    async with _session(host, port, timeout_s, f"opening {name}", source, tls) as session:
        state = await _go(session, name)
        if isinstance(state, ExportInfo):
            _disconnect(session)
            await session.writer.drain()
        return state


class CommandFailed(ServerUnavailable):
    """The server answered a command with an error (an NBD errno)."""

    def __init__(self, command: str, error: int) -> None:
        super().__init__(f"nbd-server answered {command} with error {error}")
        self.error = error


class Transmission:
    """An opened export, one command at a time: what a copy tool does, in small."""

    def __init__(self, session: _Session, info: ExportInfo) -> None:
        self._session = session
        self.info = info
        self._handle = 0

    async def _command(
        self, command: int, name: str, offset: int, length: int, *, flags: int = 0,
        data: bytes = b"", reply_bytes: int = 0,
    ) -> bytes:  # fmt: skip
        self._handle += 1
        self._session.writer.write(
            struct.pack(">IHHQQI", REQUEST_MAGIC, flags, command, self._handle, offset, length)
            + data
        )
        self._session.quickack()
        magic, error, handle = struct.unpack(">IIQ", await self._session.reader.readexactly(16))
        if magic != SIMPLE_REPLY_MAGIC or handle != self._handle:
            raise ServerUnavailable(f"bad NBD reply to {name}")
        if error:
            raise CommandFailed(name, error)
        return await self._session.reader.readexactly(reply_bytes) if reply_bytes else b""

    async def read(self, offset: int, length: int) -> bytes:
        return await self._command(CMD_READ, "READ", offset, length, reply_bytes=length)

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        flags = CMD_FLAG_FUA if fua else 0
        await self._command(CMD_WRITE, "WRITE", offset, len(data), flags=flags, data=data)

    async def write_zeroes(self, offset: int, length: int) -> None:
        await self._command(CMD_WRITE_ZEROES, "WRITE_ZEROES", offset, length)

    async def flush(self) -> None:
        await self._command(CMD_FLUSH, "FLUSH", 0, 0)

    async def trim(self, offset: int, length: int) -> None:
        await self._command(CMD_TRIM, "TRIM", offset, length)


@contextlib.asynccontextmanager
async def open_export(
    host: str,
    port: int,
    name: str,
    timeout_s: float,
    *,
    tls: NbdTls | None = None,
    disconnect: bool = True,
) -> AsyncIterator[Transmission]:
    """The export opened for I/O, disconnected cleanly on exit (NBD_CMD_DISC; without
    `disconnect`, the connection, and its TLS session, just closes); every command within
    the one deadline. Raises ServerUnavailable when it does not open, ProbeTimeout at the
    deadline."""
    async with _session(host, port, timeout_s, f"I/O on {name}", tls=tls) as session:
        state = await _go(session, name)
        if not isinstance(state, ExportInfo):
            raise ServerUnavailable(f"nbd-server would not open export {name} ({state})")
        yield Transmission(session, state)
        if disconnect:
            _disconnect(session)
            await session.writer.drain()
