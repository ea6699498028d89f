"""Rooms on the server: join, leave, publish, patterns, and connections leaving their rooms when
they end, with real clients on loopback."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest

import socketcomm
import socketcomm.aio as aio

from conftest import until


@pytest.fixture
def server() -> Iterator[socketcomm.Server]:
    # Events mode with nobody taking events: the rooms are the test's to drive.
    with socketcomm.Server("127.0.0.1", 0, event_queue=100_000) as server:
        yield server


def connect(server: socketcomm.Server, count: int) -> tuple[list[socketcomm.Client], list[int]]:
    """`count` clients, and their connection ids on the server, in the same order."""
    clients, ids = [], []
    for _ in range(count):
        known = set(server.connections)
        client = socketcomm.Client(*server.address, timeout=5)
        client.send(b"hello")  # the server learns of the client once its hello is read
        ids.append(new_connection(server, known))
        clients.append(client)
    return clients, ids


def new_connection(server: socketcomm.Server, known: set[int]) -> int:
    """The id of the one connection that is not among `known`, once there is one."""
    until(lambda: len(set(server.connections) - known) == 1)
    return (set(server.connections) - known).pop()


def nothing_more(client: socketcomm.Client, wait: float = 0.2) -> bool:
    try:
        extra = client.recv(timeout=wait)
    except TimeoutError:
        return True
    raise AssertionError(f"an unexpected message arrived: {extra!r}")


def test_publish_reaches_the_members_of_a_room_and_no_one_else(
    server: socketcomm.Server,
) -> None:
    (a, b, c), (ia, ib, ic) = connect(server, 3)
    assert server.join(ia, "lobby") is True
    assert server.join(ia, "lobby") is False, "already in it"
    assert server.join(ib, "lobby")
    assert server.join(ic, "kitchen")
    assert server.members("lobby") == sorted([ia, ib])
    assert server.rooms(ia) == ["lobby"]
    assert server.publish("lobby", b"to the lobby") == 2
    assert server.publish("lobby", "not to a", exclude=ia) == 1
    assert server.publish("empty.room", b"nobody") == 0
    assert a.recv() == b"to the lobby"
    assert [b.recv(), b.recv()] == [b"to the lobby", b"not to a"]
    assert nothing_more(a) and nothing_more(c)

    assert server.leave(ib, "lobby") is True
    assert server.leave(ib, "lobby") is False, "not in it any more"
    assert server.leave(ic, "lobby") is False, "never was"
    assert server.members("lobby") == [ia]
    assert server.publish("lobby", b"a alone") == 1
    assert a.recv() == b"a alone"
    assert nothing_more(b)
    for client in (a, b, c):
        client.close()


def test_patterns_join_every_room_they_match_and_deliver_once(
    server: socketcomm.Server,
) -> None:
    (one, rest, exact), (i_one, i_rest, i_exact) = connect(server, 3)
    server.join(i_one, "chat.*")
    server.join(i_rest, "chat.>")
    server.join(i_exact, "chat.lobby")
    server.join(i_exact, "chat.*")  # two of its rooms match: it still gets one copy
    assert server.rooms(i_exact) == ["chat.*", "chat.lobby"]
    assert server.members("chat.lobby") == sorted([i_one, i_rest, i_exact])
    assert server.members("chat.lobby.2") == [i_rest]
    assert server.members("chat") == []

    assert server.publish("chat.lobby", b"one segment") == 3
    assert server.publish("chat.lobby.2", b"two segments") == 1
    assert server.publish("chat", b"no segment after chat") == 0
    assert one.recv() == b"one segment"
    assert exact.recv() == b"one segment"
    assert [rest.recv(), rest.recv()] == [b"one segment", b"two segments"]
    assert nothing_more(one) and nothing_more(exact)
    for client in (one, rest, exact):
        client.close()


def test_names_that_break_the_rules_are_refused(server: socketcomm.Server) -> None:
    (client,), (conn,) = connect(server, 1)
    for bad in ["", "a b", "a..b", ".a", "a.", "a\nb", "chat*", "a.>.b", "x" * 256]:
        with pytest.raises(ValueError, match="invalid room or topic"):
            server.join(conn, bad)
    for pattern in ["chat.*", "chat.>", "*"]:
        with pytest.raises(ValueError, match="pattern"):
            server.publish(pattern, b"x")
        with pytest.raises(ValueError, match="pattern"):
            server.members(pattern)
    assert server.join(conn, "é.ü") and server.join(conn, "x" * 255)
    assert server.rooms(conn) == sorted(["é.ü", "x" * 255])
    client.close()


def test_a_connection_leaves_its_rooms_when_it_ends(server: socketcomm.Server) -> None:
    (staying, leaving), (i_staying, i_leaving) = connect(server, 2)
    for room in ("lobby", "chat.*"):
        server.join(i_staying, room)
        server.join(i_leaving, room)
    leaving.close()
    until(lambda: i_leaving not in server.connections)
    assert server.members("lobby") == [i_staying]
    assert server.members("chat.x") == [i_staying]
    assert server.rooms(i_leaving) == []
    with pytest.raises(socketcomm.ConnectionClosedError, match=f"no connection {i_leaving}"):
        server.join(i_leaving, "lobby")
    with pytest.raises(socketcomm.ConnectionClosedError, match="no connection 999999"):
        server.join(999_999, "lobby")
    assert server.publish("lobby", b"still here") == 1
    assert staying.recv() == b"still here"

    # A connection that the server is closing cannot join either.
    (closing,), (i_closing,) = connect(server, 1)
    server.disconnect(i_closing, "bye")
    with pytest.raises(socketcomm.ConnectionClosedError):
        server.join(i_closing, "lobby")
    assert server.members("lobby") == [i_staying]
    staying.close()
    closing.close()


def test_a_plain_socket_in_a_room_gets_the_bare_bytes(server: socketcomm.Server) -> None:
    with socket.create_connection(server.address, timeout=5) as plain:
        plain.sendall(b"hi")
        until(lambda: len(server.connections) == 1)
        (conn,) = server.connections
        server.join(conn, "lobby")
        assert server.publish("lobby", b"published") == 1
        assert plain.recv(100) == b"published"


def test_two_hundred_clients_in_twenty_rooms() -> None:
    """Each client asks to join a room and then says something to it; every message reaches
    exactly the other members of its room, once, and nothing else arrives."""
    rooms = 20
    per_room = 10

    def on_message(conn_id: int, data: bytes) -> bytes | None:
        command, _, arg = data.partition(b" ")
        if command == b"join":
            hub.join(conn_id, f"room.{arg.decode()}")
            return b"joined"
        (room,) = hub.rooms(conn_id)
        hub.publish(room, data, exclude=conn_id)
        return None

    with socketcomm.Server("127.0.0.1", 0, on_message=on_message) as hub:
        threading.Thread(target=hub.serve_forever, daemon=True).start()
        clients = [socketcomm.Client(*hub.address, timeout=10) for _ in range(rooms * per_room)]
        for index, client in enumerate(clients):
            assert client.request(f"join {index % rooms}") == b"joined"
        for room in range(rooms):
            assert len(hub.members(f"room.{room}")) == per_room
        for index, client in enumerate(clients):
            client.send(f"said {index}")
        for index, client in enumerate(clients):
            got = sorted(client.recv() for _ in range(per_room - 1))
            mates = sorted(
                f"said {other}".encode()
                for other in range(index % rooms, rooms * per_room, rooms)
                if other != index
            )
            assert got == mates, f"client {index}"
        time.sleep(0.3)  # for anything extra to arrive, once for all of them
        for client in clients:
            assert nothing_more(client, wait=0)
            client.close()


def test_rooms_from_asyncio() -> None:
    async def main() -> None:
        async with aio.Server("127.0.0.1", 0) as server:
            a = await aio.connect(*server.address, timeout=5)
            b = await aio.connect(*server.address, timeout=5)
            await a.send(b"hello")
            await b.send(b"hello")
            while len(server.connections) < 2:
                await asyncio.sleep(0.01)
            first, second = server.connections
            assert server.join(first, "chat.lobby") and server.join(second, "chat.*")
            assert server.rooms(second) == ["chat.*"]
            assert server.members("chat.lobby") == [first, second]
            assert await server.publish("chat.lobby", "both") == 2
            assert await server.publish("chat.lobby", "not a", exclude=first) == 1
            with pytest.raises(ValueError, match="pattern"):
                await server.publish("chat.*", b"x")
            assert await a.recv() == b"both"
            assert [await b.recv(), await b.recv()] == [b"both", b"not a"]
            assert server.leave(second, "chat.*")
            assert server.members("chat.lobby") == [first]
            await a.close()
            await b.close()

    asyncio.run(main())
