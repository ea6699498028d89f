"""Heartbeats: a peer that vanishes without a FIN (the impairment proxy's cable cut) is closed
with a reason within ``ping_interval + ping_timeout``, on the server and the client, sync and
asyncio; the latency is measured; raw connections are never pinged."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from impair import Proxy, Toxics

import socketcomm
import socketcomm.aio as aio

INTERVAL = 0.2
TIMEOUT = 0.4
# ping_interval + ping_timeout, and a second's room for a loaded machine.
WITHIN = INTERVAL + TIMEOUT + 1.0
QUICK: dict[str, Any] = {"ping_interval": INTERVAL, "ping_timeout": TIMEOUT}
OFF: dict[str, Any] = {"ping_interval": None, "ping_timeout": None}


def eventually(value: Callable[[], float | None], limit: float = 10) -> float:
    deadline = time.monotonic() + limit
    while (found := value()) is None:
        assert time.monotonic() < deadline, "not measured in time"
        time.sleep(0.02)
    return found


E = TypeVar("E")


def next_of(server: socketcomm.Server, kind: type[E]) -> E:
    """The next event of that kind (the others are skipped), within 10 s each."""
    while True:
        event = server.recv(timeout=10)
        if isinstance(event, kind):
            return event


def test_both_ends_measure_the_latency() -> None:
    with socketcomm.Server(mode="events", **QUICK) as server:
        with socketcomm.Client(*server.address, timeout=5, **QUICK) as client:
            assert client.latency is None, "nothing is measured before the first ping"
            connected = next_of(server, socketcomm.Connected)
            on_server = eventually(lambda: server.latency(connected.conn_id))
            on_client = eventually(lambda: client.latency)
            for latency in (on_server, on_client):
                assert 0 < latency < INTERVAL
        next_of(server, socketcomm.Disconnected)
        with pytest.raises(socketcomm.ConnectionClosedError):
            server.latency(connected.conn_id)


def test_raw_connections_are_never_pinged() -> None:
    with socketcomm.Server(mode="events", **QUICK) as server:
        with socket.create_connection(server.address, timeout=5) as sock:
            sock.sendall(b"plain")
            message = next_of(server, socketcomm.Message)
            assert message.raw
            message.reply(b"ok")
            assert sock.recv(100) == b"ok"
            time.sleep(INTERVAL + TIMEOUT * 2)
            # No ping frame arrived, and the connection is still served.
            sock.settimeout(0.1)
            with pytest.raises(TimeoutError):
                sock.recv(100)
            assert server.latency(message.conn_id) is None
            sock.sendall(b"still here")
            assert next_of(server, socketcomm.Message).data == b"still here"


def test_the_server_closes_a_client_cut_off_silently() -> None:
    with socketcomm.Server(mode="echo", **QUICK) as server:
        proxy = Proxy(server.address, Toxics())
        try:
            # The client does not ping, so only the server can notice.
            with socketcomm.Client(*proxy.address, timeout=5, **OFF) as client:
                assert client.request("before the cut") == b"before the cut"
                next_of(server, socketcomm.Connected)
                proxy.cut()
                started = time.monotonic()
                ended = next_of(server, socketcomm.Disconnected)
                took = time.monotonic() - started
                assert ended.code == 1009, ended.reason
                assert "ping_timeout" in ended.reason
                assert took < WITHIN, took
        finally:
            proxy.close()


def test_the_client_closes_a_connection_to_a_server_cut_off_silently() -> None:
    with socketcomm.Server(mode="echo", **OFF) as server:
        proxy = Proxy(server.address, Toxics())
        try:
            with socketcomm.Client(*proxy.address, timeout=10, **QUICK) as client:
                assert client.request("before the cut") == b"before the cut"
                proxy.cut()
                started = time.monotonic()
                with pytest.raises(socketcomm.ConnectionClosedError) as ended:
                    client.recv()
                took = time.monotonic() - started
                assert ended.value.code == 1009, ended.value.reason
                assert "ping_timeout" in ended.value.reason
                assert took < WITHIN, took
        finally:
            proxy.close()


def test_asyncio_both_ends_notice_a_cut() -> None:
    async def main() -> tuple[int | None, int | None]:
        async with aio.Server(mode="echo", **QUICK) as server:
            proxy = Proxy(server.address, Toxics())
            try:
                async with aio.Client(*proxy.address, timeout=10, **QUICK) as client:
                    assert await client.request("hello") == b"hello"
                    while client.latency is None:
                        await asyncio.sleep(0.02)
                    proxy.cut()
                    started = time.monotonic()
                    with pytest.raises(socketcomm.ConnectionClosedError) as on_client:
                        await client.recv()
                    assert time.monotonic() - started < WITHIN
                    while True:
                        event = await server.recv(timeout=10)
                        if isinstance(event, aio.Disconnected):
                            break
                    return on_client.value.code, event.code
            finally:
                proxy.close()

    assert asyncio.run(asyncio.wait_for(main(), 60)) == (1009, 1009)


@pytest.mark.parametrize("option", ["ping_interval", "ping_timeout"])
def test_zero_is_refused_and_none_turns_it_off(option: str) -> None:
    zero: dict[str, Any] = {option: 0}
    off: dict[str, Any] = {option: None}
    with pytest.raises(ValueError, match=option):
        socketcomm.Server(**zero)
    with socketcomm.Server(mode="echo", **off) as server:
        with pytest.raises(ValueError, match=option):
            socketcomm.Client(*server.address, **zero)
        with socketcomm.Client(*server.address, **off) as client:
            assert client.request("fine") == b"fine"
