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
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

import socketcomm
import socketcomm.aio

__all__ = [
    "socketcomm_aio_client",
    "socketcomm_client",
    "socketcomm_server",
    "socketcomm_server_factory",
    "socketcomm_server_options",
]

ServerFactory = Callable[..., socketcomm.Server]


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
