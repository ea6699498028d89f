"""Rooms across processes on a real Redis (`backplane=`): three server processes act as one set
of rooms, each message reaches every member once and in order, and a server keeps serving its
own rooms while Redis is away, then joins the others again."""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest

import socketcomm
from socketcomm.testing import RedisServer

from conftest import Background, ServerProcess, until


def drain(client: socketcomm.Client, wait: float = 0.3) -> list[bytes]:
    got = []
    while True:
        try:
            got.append(client.recv(timeout=wait))
        except TimeoutError:
            return got


def test_three_server_processes_share_one_set_of_rooms(redis_server: RedisServer) -> None:
    servers = [
        ServerProcess("--mode", "broadcast", "--backplane", redis_server.url) for _ in range(3)
    ]
    clients: list[socketcomm.Client] = []
    try:
        for server in servers:
            server.wait_for_line("stderr", "backplane .* connected")
        # Two clients on each server, all in the lobby; a seventh elsewhere.
        for server in servers:
            for _ in range(2):
                client = socketcomm.Client("127.0.0.1", server.port, timeout=5)
                assert client.subscribe("lobby")
                clients.append(client)
        elsewhere = socketcomm.Client("127.0.0.1", servers[2].port, timeout=5)
        assert elsewhere.subscribe("kitchen")

        talker = clients[0]
        sent = [f"message {n}".encode() for n in range(50)]
        for message in sent:
            talker.publish("lobby", message)
        for index, client in enumerate(clients[1:], start=1):
            got = [client.recv_message() for _ in sent]
            assert [m.data for m in got] == sent, f"client {index}: all, once, in order"
            assert {m.topic for m in got} == {"lobby"}
        for client in [talker, elsewhere, *clients[1:]]:
            assert drain(client, 0.2) == [], "nothing twice, nothing to the publisher"

        # A plain message in the broadcast mode reaches every other client of every server.
        clients[3].send(b"to everyone")
        for client in [c for c in clients if c is not clients[3]] + [elsewhere]:
            assert client.recv(timeout=5) == b"to everyone"
    finally:
        for client in clients:
            client.close()
        for server in servers:
            server.stop()


def wait_for(condition: Callable[[], bool], limit: float = 15) -> None:
    until(condition, limit)


def connected(server: socketcomm.Server) -> Callable[[], bool]:
    return lambda: server.stats()["backplane_connected"] == 1


def test_redis_going_away_and_coming_back(redis_server: RedisServer) -> None:
    first = socketcomm.Server("127.0.0.1", 0, mode="broadcast", backplane=redis_server.url)
    second = socketcomm.Server("127.0.0.1", 0, mode="broadcast", backplane=redis_server.url)
    try:
        for server in (first, second):
            server.start()
            wait_for(connected(server))
        here, near = (socketcomm.Client(*first.address, timeout=5) for _ in range(2))
        far = socketcomm.Client(*second.address, timeout=5)
        for client in (here, near, far):
            assert client.subscribe("lobby")
        here.publish("lobby", b"with redis")
        assert near.recv() == b"with redis" and far.recv() == b"with redis"

        redis_server.stop()
        wait_for(lambda: first.stats()["backplane_connected"] == 0)
        dropped = first.stats()["backplane_dropped"]
        here.publish("lobby", b"without redis")
        assert near.recv() == b"without redis", "local delivery goes on"
        with pytest.raises(TimeoutError):
            far.recv(timeout=0.5)
        wait_for(lambda: first.stats()["backplane_dropped"] > dropped)

        redis_server.start()
        for server in (first, second):
            wait_for(connected(server))
        here.publish("lobby", b"redis is back")
        assert near.recv() == b"redis is back"
        assert far.recv(timeout=5) == b"redis is back", "the servers subscribed again"
        stats = second.stats()
        assert stats["backplane_received"] >= 2
        assert first.stats()["backplane_published"] >= 2
        for client in (here, near, far):
            client.close()
    finally:
        first.close()
        second.close()


def test_a_backplane_that_is_not_a_url_is_refused() -> None:
    with pytest.raises(ValueError, match="invalid backplane"):
        socketcomm.Server("127.0.0.1", 0, backplane="not a url")


def test_without_redis_a_server_serves_alone_and_says_so() -> None:
    with socketcomm.Server(
        "127.0.0.1", 0, mode="broadcast", backplane="redis://127.0.0.1:1/0"
    ) as server:
        server.start()
        a, b = (socketcomm.Client(*server.address, timeout=5) for _ in range(2))
        a.send(b"local")
        assert b.recv() == b"local"
        assert server.stats()["backplane_connected"] == 0
        assert server.stats()["backplane_dropped"] >= 1
        a.close()
        b.close()


def test_the_command_line_says_when_redis_is_not_there() -> None:
    server = Background(
        [
            sys.executable,
            "server.py",
            "--port",
            "0",
            "--mode",
            "broadcast",
            "--backplane",
            "redis://127.0.0.1:1/0",
        ]
    )
    try:
        server.wait_for_line("stderr", "not reachable yet: serving this server's rooms alone")
    finally:
        server.stop()
