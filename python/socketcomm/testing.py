"""A pytest plugin: fixtures that give your tests a real socketcomm server on an ephemeral
loopback port and clients connected to it, so your handlers are exercised over real sockets.

It is registered through the ``pytest11`` entry point, so installing socketcomm is enough.

    # conftest.py: what the server runs (the default is mode="echo")
    import pytest

    @pytest.fixture
    def socketcomm_server_options():
        return {"on_message": lambda conn_id, data: data.upper()}

    # test_mine.py
    def test_upper(socketcomm_client):
        assert socketcomm_client.request("hi") == b"HI"

    async def test_upper_async(socketcomm_aio_client):   # with pytest-asyncio or anyio
        async with socketcomm_aio_client as client:
            assert await client.request("hi") == b"HI"

Fixtures:
  socketcomm_server_options  the keyword options of the server (override it; default echo)
  socketcomm_server          a started `socketcomm.Server` on 127.0.0.1, closed after the test
  socketcomm_client          a `socketcomm.Client` connected to it (5 s timeout)
  socketcomm_aio_client      a `socketcomm.aio.Client` for it, to enter with `async with` in
                             the test's own event loop
  socketcomm_server_factory  makes more servers: ``factory(**options)``; all closed after

And `RedisServer`, a throwaway ``redis-server`` on a free loopback port, for tests of a
``backplane=`` (socketcomm's own tests and benchmarks use it).
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import socketcomm
import socketcomm.aio

__all__ = [
    "RedisServer",
    "socketcomm_aio_client",
    "socketcomm_client",
    "socketcomm_server",
    "socketcomm_server_factory",
    "socketcomm_server_options",
]

ServerFactory = Callable[..., socketcomm.Server]


class RedisServer:
    """A ``redis-server`` (the binary at ``binary``) of its own on a free loopback port, saving
    nothing but into ``folder``; `stop()` and `start()` again on the same port stand for Redis
    going away and coming back."""

    def __init__(self, binary: str, folder: Path) -> None:
        self.binary = binary
        self.folder = folder
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port: int = probe.getsockname()[1]
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        """The running redis-server's process id."""
        assert self.process is not None, "started in __init__"
        return self.process.pid

    def start(self) -> None:
        """Starts it, and returns once it answers PING (within 10 s, else RuntimeError)."""
        options = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), *options, "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def socketcomm_server_options() -> dict[str, Any]:
    """The keyword options `socketcomm_server` is made with; override to test your handlers."""
    return {"mode": "echo"}


@pytest.fixture
def socketcomm_server_factory() -> Iterator[ServerFactory]:
    """Makes started servers on ephemeral loopback ports; closes them after the test."""
    made: list[socketcomm.Server] = []

    def factory(**options: Any) -> socketcomm.Server:
        server = socketcomm.Server("127.0.0.1", 0, **options)
        server.start()
        made.append(server)
        return server

    yield factory
    for server in made:
        server.close(timeout=2)


@pytest.fixture
def socketcomm_server(
    socketcomm_server_factory: ServerFactory, socketcomm_server_options: dict[str, Any]
) -> socketcomm.Server:
    """A started server on an ephemeral loopback port, with `socketcomm_server_options`."""
    return socketcomm_server_factory(**socketcomm_server_options)


@pytest.fixture
def socketcomm_client(socketcomm_server: socketcomm.Server) -> Iterator[socketcomm.Client]:
    """A client connected to `socketcomm_server`."""
    with socketcomm.Client(*socketcomm_server.address, timeout=5) as client:
        yield client


@pytest.fixture
def socketcomm_aio_client(socketcomm_server: socketcomm.Server) -> socketcomm.aio.Client:
    """An asyncio client for `socketcomm_server`, connected by ``async with`` in the test."""
    return socketcomm.aio.Client(*socketcomm_server.address, timeout=5)
