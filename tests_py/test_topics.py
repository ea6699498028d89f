"""Topics from the client (protocol version 2): subscribe, unsubscribe, publish, the topic a
message arrives with, the native relay of the broadcast mode, and version-1 peers on either
side, with real sockets on loopback."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

import socketcomm
import socketcomm.aio as aio

from conftest import recv_exactly, until

MAGIC = b"\x89SCM"
DATA, SUBSCRIBE, PUBLISH, CLOSE = 0x01, 0x40, 0x42, 0x30


@pytest.fixture
def server() -> Iterator[socketcomm.Server]:
    """A server in events mode whose events the test takes itself."""
    with socketcomm.Server("127.0.0.1", 0, event_queue=10_000) as server:
        yield server


def messages(server: socketcomm.Server, count: int) -> list[socketcomm.Message]:
    found: list[socketcomm.Message] = []
    deadline = time.monotonic() + 5
    while len(found) < count:
        assert time.monotonic() < deadline, f"only {len(found)} of {count} messages came"
        for event in server.recv_many(timeout=0.1):
            if isinstance(event, socketcomm.Message):
                found.append(event)
    return found


def test_a_subscriber_receives_what_is_published_with_its_topic(
    server: socketcomm.Server,
) -> None:
    with socketcomm.Client(*server.address, timeout=5) as client:
        assert client.subscribe("chat.*") is True
        assert client.subscribe("chat.*") is False, "subscribed already"
        (conn,) = server.connections
        assert server.rooms(conn) == ["chat.*"]
        assert server.members("chat.lobby") == [conn]

        assert server.publish("chat.lobby", b"to the lobby") == 1
        received = client.recv_message()
        assert (received.topic, received.data, received.text) == (
            "chat.lobby",
            b"to the lobby",
            "to the lobby",
        )
        assert "chat.lobby" in repr(received)
        server.send(conn, b"direct")
        direct = client.recv_message()
        assert (direct.topic, direct.data) == (None, b"direct")
        server.publish("chat.kitchen", b"as bytes")
        assert client.recv() == b"as bytes", "recv() gives the bytes of a published message"

        assert client.unsubscribe("chat.*") is True
        assert client.unsubscribe("chat.*") is False, "not subscribed any more"
        assert server.members("chat.lobby") == []
        assert server.publish("chat.lobby", b"nobody") == 0


def test_a_publish_reaches_the_application_with_its_topic(server: socketcomm.Server) -> None:
    with socketcomm.Client(*server.address, timeout=5) as client:
        client.publish("prices.eur", b"1.08")
        client.send(b"plain")
        published, plain = messages(server, 2)
        assert (published.topic, published.data) == ("prices.eur", b"1.08")
        assert (plain.topic, plain.data) == (None, b"plain")


def test_names_are_checked_before_anything_is_sent(server: socketcomm.Server) -> None:
    with socketcomm.Client(*server.address, timeout=5) as client:
        for bad in ["", "a b", "a..b", "a*", "x" * 256]:
            with pytest.raises(ValueError, match="invalid room or topic"):
                client.subscribe(bad)
        with pytest.raises(ValueError, match="pattern"):
            client.publish("chat.*", b"x")
        assert client.subscribe("ok") is True, "the connection is still fine"


def test_the_broadcast_mode_relays_topics_natively() -> None:
    with socketcomm.Server("127.0.0.1", 0, mode="broadcast") as server:
        server.start()
        clients = [socketcomm.Client(*server.address, timeout=5) for _ in range(4)]
        talker, one, rest, other = clients
        assert talker.subscribe("chat.*")
        assert one.subscribe("chat.*")
        assert rest.subscribe("chat.>")
        assert other.subscribe("news.>")
        talker.publish("chat.lobby", b"hi lobby")
        talker.publish("chat.lobby.2", b"deeper")
        for client, expected in [(one, [b"hi lobby"]), (rest, [b"hi lobby", b"deeper"])]:
            got = [client.recv_message() for _ in expected]
            assert [m.data for m in got] == expected
            assert got[0].topic == "chat.lobby"
        # A plain message still goes to every other client, the talker's own topics aside.
        talker.send(b"to all")
        for client in (one, rest, other):
            assert client.recv_message().data == b"to all"
        for client in (talker, one, other):
            with pytest.raises(TimeoutError):
                client.recv(timeout=0.2)
        for client in clients:
            client.close()


def version_1_hello() -> bytes:
    return MAGIC + bytes([1, 1]) + b"\0\0" + struct.pack(">I", 1 << 20)


def recv_frame(sock: socket.socket) -> tuple[int, bytes]:
    (length,) = struct.unpack(">I", recv_exactly(sock, 4))
    frame = recv_exactly(sock, length)
    return frame[0], frame[1:]


def test_a_version_1_client_is_served_and_told_that_topics_need_version_2(
    server: socketcomm.Server,
) -> None:
    with socket.create_connection(server.address, timeout=5) as v1:
        v1.sendall(version_1_hello())
        answer = recv_exactly(v1, 12)
        assert answer[4:6] == bytes([1, 1]), "the server settles on version 1"
        until(lambda: len(server.connections) == 1)
        (conn,) = server.connections
        server.join(conn, "lobby")
        server.publish("lobby", b"to a v1 client")
        assert recv_frame(v1) == (DATA, b"to a v1 client"), "a plain message, without topic"

        body = struct.pack(">I", 1) + b"lobby"
        v1.sendall(struct.pack(">IB", 1 + len(body), SUBSCRIBE) + body)
        kind, close = recv_frame(v1)
        assert kind == CLOSE
        (code,) = struct.unpack(">H", close[:2])
        assert code == 1002
        assert b"version 2" in close[2:]


def test_a_client_of_a_version_1_server_is_told_it_has_no_topics() -> None:
    """A stand-in for a server from before topics: it answers every hello with version 1."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def serve() -> None:
        conn, _ = listener.accept()
        accepted.append(conn)
        hello = recv_exactly(conn, 12)
        assert hello[4:6] == bytes([1, 2]), "this client offers versions 1 to 2"
        conn.sendall(version_1_hello())

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with socketcomm.Client(*listener.getsockname(), timeout=5) as client:
            thread.join(timeout=5)
            with pytest.raises(socketcomm.ProtocolError, match="protocol version 1"):
                client.subscribe("lobby")
            with pytest.raises(socketcomm.ProtocolError, match="protocol version 1"):
                client.publish("lobby", b"x")
    finally:
        for conn in accepted:
            conn.close()
        listener.close()


def test_a_raw_client_has_no_topics(server: socketcomm.Server) -> None:
    with socketcomm.Client(*server.address, timeout=5, raw=True) as client:
        with pytest.raises(socketcomm.ProtocolError, match="raw"):
            client.subscribe("lobby")


def test_topics_from_asyncio(server: socketcomm.Server) -> None:
    async def main() -> None:
        async with aio.Client(*server.address, timeout=5) as client:
            assert await client.subscribe("chat.>") is True
            assert await client.subscribe("chat.>") is False
            (conn,) = server.connections
            server.publish("chat.a.b", "deep")
            received = await client.recv_message()
            assert (received.topic, received.data) == ("chat.a.b", b"deep")
            await client.publish("chat.a", b"from asyncio")
            with pytest.raises(ValueError, match="pattern"):
                await client.publish("chat.*", b"x")
            assert await client.unsubscribe("chat.>") is True
            assert server.members("chat.a") == []
            assert conn in server.connections

    asyncio.run(main())
    (published,) = messages(server, 1)
    assert (published.topic, published.data) == ("chat.a", b"from asyncio")


def test_on_subscribe_decides_who_may_subscribe() -> None:
    asked: list[tuple[int, str]] = []

    def on_subscribe(conn_id: int, topic: str) -> bool:
        asked.append((conn_id, topic))
        if topic == "boom":
            raise RuntimeError("the check itself failed")
        return not topic.startswith("admin.")

    with socketcomm.Server(
        "127.0.0.1", 0, on_message=lambda conn, data: data, on_subscribe=on_subscribe
    ) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        with socketcomm.Client(*server.address, timeout=5) as client:
            assert client.subscribe("chat.*") is True
            with pytest.raises(PermissionError, match="on_subscribe refused it"):
                client.subscribe("admin.>")
            with pytest.raises(PermissionError, match="on_subscribe failed"):
                client.subscribe("boom")
            with pytest.raises(ValueError, match="invalid room or topic"):
                client.subscribe("a b")  # refused here, never asked
            assert client.request(b"still served") == b"still served"
            (conn,) = server.connections
            assert server.rooms(conn) == ["chat.*"]
            assert asked == [(conn, "chat.*"), (conn, "admin.>"), (conn, "boom")]
            assert server.publish("chat.x", b"allowed") == 1
            assert client.recv_message().topic == "chat.x"
            assert server.publish("admin.x", b"not for it") == 0


def test_on_subscribe_must_be_callable() -> None:
    with pytest.raises(TypeError, match="on_subscribe"):
        socketcomm.Server("127.0.0.1", 0, on_subscribe="yes")  # type: ignore[arg-type]


def test_a_reconnecting_client_subscribes_again(server: socketcomm.Server) -> None:
    with socketcomm.Client(*server.address, timeout=5, retries=3, backoff=0.05) as client:
        assert client.subscribe("lobby")
        (first,) = server.connections
        server.disconnect(first, "go away for a moment")

        def publish_once_subscribed_again() -> None:
            until(lambda: server.members("lobby") not in ([], [first]))
            assert server.publish("lobby", b"to the new connection") == 1

        publisher = threading.Thread(target=publish_once_subscribed_again)
        publisher.start()
        # recv finds the connection lost, connects again, subscribes again, and waits there.
        assert client.recv_message(timeout=10).data == b"to the new connection"
        publisher.join(timeout=10)
        (second,) = server.members("lobby")
        assert second != first


@pytest.mark.parametrize("serving", ["start", "serve_forever"])
def test_on_subscribe_in_the_native_broadcast_mode(serving: str) -> None:
    """The broadcast mode relays topics with no Python per message; on_subscribe still
    decides who may subscribe (one thread answers the subscriptions)."""
    with socketcomm.Server(
        "127.0.0.1",
        0,
        mode="broadcast",
        on_subscribe=lambda conn_id, topic: topic != "secret",
    ) as server:
        if serving == "start":
            server.start()
        else:
            threading.Thread(target=server.serve_forever, daemon=True).start()
        talker, listener = (socketcomm.Client(*server.address, timeout=5) for _ in range(2))
        assert listener.subscribe("news")
        with pytest.raises(PermissionError, match="refused"):
            listener.subscribe("secret")
        talker.publish("news", b"relayed natively")
        talker.publish("secret", b"nobody may hear this")
        assert listener.recv_message().data == b"relayed natively"
        with pytest.raises(TimeoutError):
            listener.recv(timeout=0.3)
        talker.close()
        listener.close()


def test_per_message_handlers_still_need_the_events_mode() -> None:
    with pytest.raises(ValueError, match="need mode='events'"):
        socketcomm.Server("127.0.0.1", 0, mode="broadcast", on_message=lambda c, d: d)


def test_the_pull_loop_answers_subscription_requests() -> None:
    with socketcomm.Server("127.0.0.1", 0, screen_subscriptions=True) as server:
        answered: list[str] = []

        def serve() -> None:
            for event in server:
                if isinstance(event, socketcomm.SubscriptionRequest):
                    answered.append(event.topic)
                    assert event.conn_id in server.connections
                    assert "SubscriptionRequest" in repr(event)
                    if event.topic == "open":
                        event.accept()
                    elif event.topic == "closed":
                        event.refuse("members only")
                    else:
                        del event  # dropped unanswered, which refuses it

        threading.Thread(target=serve, daemon=True).start()
        with socketcomm.Client(*server.address, timeout=5) as client:
            assert client.subscribe("open")
            with pytest.raises(PermissionError, match="members only"):
                client.subscribe("closed")
            with pytest.raises(PermissionError, match="did not answer"):
                client.subscribe("ignored")
        assert answered == ["open", "closed", "ignored"]


def test_on_subscribe_from_asyncio() -> None:
    async def allowed(conn_id: int, topic: str) -> bool:
        await asyncio.sleep(0.01)
        return topic.startswith("public.")

    async def main() -> None:
        async with aio.Server("127.0.0.1", 0, on_subscribe=allowed) as server:
            server.start()
            async with aio.Client(*server.address, timeout=5) as client:
                assert await client.subscribe("public.news") is True
                with pytest.raises(PermissionError, match="refused"):
                    await client.subscribe("private.diary")
                (conn,) = server.connections
                assert server.rooms(conn) == ["public.news"]

    asyncio.run(main())
