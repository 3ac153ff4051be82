"""A TCP proxy for tests: cut a client's connection to a shared service (RabbitMQ,
MariaDB) without stopping the service other tests use."""

from __future__ import annotations

import asyncio
import contextlib


class TcpProxy:
    def __init__(self, upstream_host: str, upstream_port: int, *, record: bool = True) -> None:
        """`record=False`: keep no copy of the traffic (the soak runs for hours)."""
        self._upstream = (upstream_host, upstream_port)
        self._record = record
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        #: Every byte clients sent upstream: what crossed the wire from the client side.
        self.client_bytes = bytearray()

    async def start(self) -> int:
        """Listens (again: on the same port after a stop) and returns the port."""
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        record: bytearray | None = None,
    ) -> None:
        try:
            while data := await reader.read(65536):
                if record is not None:
                    record += data
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            self._writers.discard(writer)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        for task in (
            asyncio.create_task(
                self._pipe(reader, up_writer, self.client_bytes if self._record else None)
            ),
            asyncio.create_task(self._pipe(up_reader, writer)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def cut(self) -> None:
        """Drops every open connection (new ones still get through while started)."""
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def stop(self) -> None:
        """Refuses new connections and drops the open ones."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        self.cut()
        for task in list(self._tasks):
            task.cancel()
