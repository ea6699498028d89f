"""An impairment proxy for the tests, in the manner of Toxiproxy's toxics: a TCP proxy on
loopback that forwards to a server and spoils the traffic in ways a queueing discipline cannot:

- ``latency``: every chunk waits this many seconds before it is forwarded (order is kept);
- ``slice``: chunks are written this many bytes at a time, each its own segment;
- ``stall_after``: after this many bytes in a direction, nothing more is forwarded that way;
- ``reset_after``: once this many bytes in a direction have reached the far end, both
  connections are reset (RST).

``cut()`` is the cable cut: from then on nothing more is forwarded either way on any
connection, and no FIN or RST tells either end (the sockets stay open).

Each toxic applies to ``upstream`` (client to server), ``downstream`` (server to client) or
both, as ``direction`` says. The proxy runs its own event loop on a thread.
"""

from __future__ import annotations

import asyncio
import fcntl
import socket
import struct
import termios
import threading
import time
from dataclasses import dataclass


@dataclass
class Toxics:
    latency: float = 0.0
    slice: int | None = None
    stall_after: int | None = None
    reset_after: int | None = None
    direction: str = "both"  # "upstream", "downstream" or "both"

    def applies(self, direction: str) -> bool:
        return self.direction in ("both", direction)


class Proxy:
    def __init__(self, upstream: tuple[str, int], toxics: Toxics) -> None:
        self.upstream = upstream
        self.toxics = toxics
        self.connections = 0
        self.resets = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._cut = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._started.wait(10)

    @property
    def address(self) -> tuple[str, int]:
        return self._address

    _address: tuple[str, int]

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0)
        )
        host, port = self._server.sockets[0].getsockname()[:2]
        self._address = (str(host), int(port))
        self._started.set()
        self._loop.run_forever()

    async def _serve(
        self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        try:
            server_reader, server = await asyncio.open_connection(*self.upstream)
        except OSError:
            client.close()
            return
        for writer in (client, server):
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._writers.add(writer)
        ends = (client, server)
        await asyncio.gather(
            self._pump(client_reader, server, "upstream", ends),
            self._pump(server_reader, client, "downstream", ends),
            return_exceptions=True,
        )

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        direction: str,
        ends: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        toxics = self.toxics if self.toxics.applies(direction) else Toxics()
        forwarded = 0
        try:
            while data := await reader.read(65536):
                if self._cut.is_set():
                    await asyncio.Event().wait()  # forever: nothing gets through any more
                if toxics.latency:
                    await asyncio.sleep(toxics.latency)
                if toxics.stall_after is not None and forwarded + len(data) > toxics.stall_after:
                    data = data[: max(0, toxics.stall_after - forwarded)]
                    await self._write(writer, data, toxics.slice)
                    await asyncio.Event().wait()  # forever: the stall
                if toxics.reset_after is not None and forwarded + len(data) > toxics.reset_after:
                    await self._write(writer, data[: toxics.reset_after - forwarded], toxics.slice)
                    await self._delivered(writer)
                    self._reset(ends)
                    return
                await self._write(writer, data, toxics.slice)
                forwarded += len(data)
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            for end in ends:
                end.close()

    @staticmethod
    async def _write(writer: asyncio.StreamWriter, data: bytes, size: int | None) -> None:
        if size is None:
            writer.write(data)
            await writer.drain()
            return
        for start in range(0, len(data), size):
            writer.write(data[start : start + size])
            await writer.drain()
            await asyncio.sleep(0)  # let each slice leave as its own segment

    @staticmethod
    async def _delivered(writer: asyncio.StreamWriter, timeout: float = 5.0) -> None:
        """Waits until the far end has acknowledged every byte written to it (or `timeout`).

        A reset throws away what the proxy's own send queue still holds, so without this wait
        how many of the bytes before the reset reach the far end would depend on how busy the
        machine is; what the far end has acknowledged it can still read after the reset."""
        sock = writer.get_extra_info("socket")
        unsent = bytearray(4)  # SIOCOUTQ (= TIOCOUTQ on Linux): bytes sent and not yet acked
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, unsent)
            if writer.transport.get_write_buffer_size() == 0 and unsent == bytes(4):
                return
            await asyncio.sleep(0.002)

    def _reset(self, ends: tuple[asyncio.StreamWriter, asyncio.StreamWriter]) -> None:
        self.resets += 1
        for end in ends:
            sock = end.get_extra_info("socket")
            # SO_LINGER with a zero timeout: close() sends RST instead of FIN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            end.transport.abort()

    def cut(self) -> None:
        """Silently drops everything from now on, in both directions (see the module doc)."""
        self._cut.set()

    def close(self) -> None:
        async def stop() -> None:
            self._server.close()
            for writer in self._writers:
                writer.transport.abort()
            current = asyncio.current_task()
            pending = [task for task in asyncio.all_tasks() if task is not current]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
