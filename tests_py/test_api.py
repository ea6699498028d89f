"""The Python API over real loopback sockets: servers, clients, events, modes and threads."""

from __future__ import annotations

import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import socketcomm

from conftest import ReplyingServer, echo_under_backpressure


def test_server_binds_on_construction_and_reports_its_address() -> None:
    server = socketcomm.Server("127.0.0.1", 0)
    try:
        host, port = server.address
        assert host == "127.0.0.1"
        assert port > 0
        assert repr(server) == f"<socketcomm.Server 127.0.0.1:{port} mode=events open>"
        assert not server.closed
    finally:
        server.close()
    assert server.closed


def test_events_come_in_order_with_their_details(replying_server: ReplyingServer) -> None:
    with socketcomm.Client(*replying_server.address, timeout=5) as client:
        assert client.request("hello") == b"got hello"
        client.send(b"plain")
        assert client.recv() == b"got plain"
        local = client.local_address
    deadline = time.monotonic() + 5
    while len(replying_server.events) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    connected, request, message, disconnected = replying_server.events
    assert isinstance(connected, socketcomm.Connected)
    assert connected.peer == local
    assert isinstance(request, socketcomm.Message)
    assert request.data == b"hello"
    assert request.text == "hello"
    assert request.request_id is not None
    assert request.conn_id == connected.conn_id
    assert isinstance(message, socketcomm.Message)
    assert message.request_id is None
    assert not message.raw
    assert isinstance(disconnected, socketcomm.Disconnected)
    assert disconnected.conn_id == connected.conn_id
    assert disconnected.code == 1000
    assert "closed by the client" in disconnected.reason
    assert repr(connected) == f"Connected(conn_id={connected.conn_id}, peer={local!r})"


def test_recv_on_the_server_times_out_and_loses_nothing() -> None:
    with socketcomm.Server("127.0.0.1", 0) as server:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="no event within"):
            server.recv(timeout=0.2)
        assert 0.15 < time.monotonic() - started < 2
        with socketcomm.Client(*server.address) as client:
            assert isinstance(server.recv(timeout=5), socketcomm.Connected)
            client.send("one")
            event = server.recv(timeout=5)
            assert isinstance(event, socketcomm.Message)
            assert event.data == b"one"
            server.send(event.conn_id, "pushed by the server")
            assert client.recv(timeout=5) == b"pushed by the server"


def test_a_message_from_a_plain_socket_says_it_is_raw() -> None:
    with socketcomm.Server("127.0.0.1", 0) as server:
        with socket.create_connection(server.address, timeout=5) as sock:
            sock.sendall(b"no framing here")
            event = server.recv(timeout=5)
            while not isinstance(event, socketcomm.Message):
                event = server.recv(timeout=5)
            assert event.raw
            assert event.data == b"no framing here"
            event.reply(b"bare bytes back")
            assert sock.recv(1024) == b"bare bytes back"


def test_replies_wait_for_room_in_a_full_queue_and_keep_their_order() -> None:
    with socketcomm.Server("127.0.0.1", 0, outbound_queue=4, slow_reader="wait") as server:

        def serve() -> None:
            for event in server:
                if isinstance(event, socketcomm.Message):
                    event.reply(event.data)  # blocks while the queue is full

        serving = threading.Thread(target=serve, daemon=True)
        serving.start()
        echo_under_backpressure(server.address)
    serving.join(timeout=5)
    assert not serving.is_alive()


def test_iteration_ends_when_the_server_is_closed() -> None:
    server = socketcomm.Server("127.0.0.1", 0)
    seen: list[socketcomm.Event] = []

    def consume() -> None:
        seen.extend(server)

    consumer = threading.Thread(target=consume)
    consumer.start()
    with socketcomm.Client(*server.address) as client:
        client.send(b"x")
    time.sleep(0.2)
    server.close()
    consumer.join(timeout=5)
    assert not consumer.is_alive()
    assert [type(e).__name__ for e in seen] == ["Connected", "Message", "Disconnected"]
    with pytest.raises(socketcomm.ConnectionClosedError, match="server is closed"):
        server.recv(timeout=1)
    with pytest.raises(socketcomm.ConnectionClosedError):
        server.start()


@pytest.mark.parametrize(
    "payload", ["text é", b"bytes", bytearray(b"bytearray"), memoryview(b"memoryview")]
)
def test_send_takes_str_and_any_bytes_like(
    echo_server: socketcomm.Server, payload: str | bytes | bytearray | memoryview
) -> None:
    expected = payload.encode() if isinstance(payload, str) else bytes(payload)
    with socketcomm.Client(*echo_server.address, timeout=5) as client:
        assert client.request(payload) == expected
        client.send(payload)
        assert client.recv() == expected


def test_send_refuses_what_is_not_bytes_like(echo_server: socketcomm.Server) -> None:
    with socketcomm.Client(*echo_server.address, timeout=5) as client:
        with pytest.raises(TypeError, match="got int"):
            client.send(3)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="got dict"):
            client.request({})  # type: ignore[arg-type]


def test_ack_mode_replies_natively_with_the_original_answer() -> None:
    with socketcomm.Server("127.0.0.1", 0, mode="ack") as server:
        assert server.mode == "ack"
        with socketcomm.Client(*server.address, timeout=5) as client:
            assert client.request("Hello World") == socketcomm.ACK_REPLY
    assert socketcomm.ACK_REPLY == b"Your message has been received, Thank you!"
    with (
        socketcomm.Server("127.0.0.1", 0, mode="ack", reply="ok") as server,
        socketcomm.Client(*server.address, timeout=5) as client,
    ):
        assert client.request("x") == b"ok"


def test_handlers_run_on_a_dispatcher_and_a_failing_handler_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[tuple[str, object]] = []

    def on_message(conn_id: int, data: bytes) -> bytes | None:
        if data == b"boom":
            raise RuntimeError("handler failure")
        if data == b"silent":
            return None
        return data.upper()

    server = socketcomm.Server(
        "127.0.0.1",
        0,
        on_message=on_message,
        on_connect=lambda conn_id, peer: calls.append(("connect", peer)),
        on_disconnect=lambda conn_id, reason: calls.append(("disconnect", reason)),
    )
    with caplog.at_level(logging.ERROR, logger="socketcomm.server"):
        runner = threading.Thread(target=server.serve_forever)
        runner.start()
        with socketcomm.Client(*server.address, timeout=5) as client:
            assert client.request("abc") == b"ABC"
            client.send("boom")
            client.send("silent")
            assert client.request("still serving") == b"STILL SERVING"
            with pytest.raises(TimeoutError):
                client.recv(timeout=0.2)
        server.close()
        runner.join(timeout=5)
        assert not runner.is_alive()
    assert calls[0][0] == "connect"
    assert calls[-1][0] == "disconnect"
    assert any("on_message handler raised" in r.message and r.exc_info for r in caplog.records), (
        caplog.records
    )


def test_start_runs_handlers_in_the_background() -> None:
    server = socketcomm.Server("127.0.0.1", 0, on_message=lambda conn, data: b"<" + data + b">")
    server.start()
    try:
        with socketcomm.Client(*server.address, timeout=5) as client:
            assert client.request("x") == b"<x>"
    finally:
        server.close()


def test_serve_forever_needs_something_to_answer_with() -> None:
    with socketcomm.Server("127.0.0.1", 0) as server:
        with pytest.raises(ValueError, match="nothing would answer"):
            server.serve_forever()


def test_serve_forever_returns_when_closed_from_another_thread() -> None:
    server = socketcomm.Server("127.0.0.1", 0, mode="echo")
    threading.Timer(0.3, server.close).start()
    started = time.monotonic()
    server.serve_forever()
    assert time.monotonic() - started < 5


def test_one_client_shared_by_many_threads_gets_every_reply_right(
    replying_server: ReplyingServer,
) -> None:
    with socketcomm.Client(*replying_server.address, timeout=10) as client:

        def ask(worker: int) -> None:
            for i in range(100):
                payload = f"{worker}:{i}".encode()
                assert client.request(payload) == b"got " + payload

        with ThreadPoolExecutor(max_workers=8) as pool:
            for result in [pool.submit(ask, w) for w in range(8)]:
                result.result(timeout=60)


def test_many_clients_at_once(echo_server: socketcomm.Server) -> None:
    def talk(n: int) -> None:
        with socketcomm.Client(*echo_server.address, timeout=10) as client:
            for i in range(20):
                assert client.request(f"{n}-{i}") == f"{n}-{i}".encode()

    with ThreadPoolExecutor(max_workers=50) as pool:
        for result in [pool.submit(talk, n) for n in range(100)]:
            result.result(timeout=60)


def test_client_iteration_ends_when_the_server_closes() -> None:
    server = socketcomm.Server("127.0.0.1", 0)
    client = socketcomm.Client(*server.address, timeout=5)
    event = server.recv(timeout=5)
    assert isinstance(event, socketcomm.Connected)
    for word in ("a", "b", "c"):
        server.send(event.conn_id, word)
    server.close()
    assert list(client) == [b"a", b"b", b"c"]
    client.close()


def test_blocking_calls_release_the_gil(echo_server: socketcomm.Server) -> None:
    with socketcomm.Client(*echo_server.address) as client:
        counter = 0
        stop = threading.Event()

        def count() -> None:
            nonlocal counter
            while not stop.is_set():
                counter += 1

        counting = threading.Thread(target=count)
        counting.start()
        with pytest.raises(TimeoutError):
            client.recv(timeout=0.5)
        stop.set()
        counting.join()
    # With the GIL held for the whole wait, the counter would barely move.
    assert counter > 10_000


def test_context_managers_close() -> None:
    with socketcomm.Server("127.0.0.1", 0, mode="echo") as server:
        with socketcomm.Client(*server.address) as client:
            assert not client.closed
        assert client.closed
        assert "closed" in repr(client)
    assert server.closed


def test_invalid_options_are_refused_with_their_name() -> None:
    with pytest.raises(ValueError, match="invalid mode"):
        socketcomm.Server("127.0.0.1", 0, mode="bogus")
    with pytest.raises(ValueError, match="invalid max_frame"):
        socketcomm.Server("127.0.0.1", 0, max_frame=10)
    with pytest.raises(ValueError, match="on_\\* handlers need mode='events'"):
        socketcomm.Server("127.0.0.1", 0, mode="echo", on_message=lambda c, d: d)
    with socketcomm.Server("127.0.0.1", 0, mode="echo") as server:
        with pytest.raises(ValueError, match="invalid timeout"):
            socketcomm.Client(*server.address, timeout=-1)
        with pytest.raises(ValueError, match="invalid connect_timeout"):
            socketcomm.Client(*server.address, connect_timeout=0)
    with pytest.raises(ValueError, match="invalid port: 70000 is not an integer from 0 to 65535"):
        socketcomm.Server("127.0.0.1", 70000)


def test_exceptions_subclass_the_builtins_people_catch() -> None:
    assert issubclass(socketcomm.ConnectionClosedError, socketcomm.SocketCommError)
    assert issubclass(socketcomm.ConnectionClosedError, ConnectionError)
    assert issubclass(socketcomm.FrameTooLargeError, socketcomm.ProtocolError)
    assert issubclass(socketcomm.FrameTooLargeError, ValueError)
    assert issubclass(socketcomm.TlsError, ConnectionError)
    assert issubclass(socketcomm.TransferError, socketcomm.SocketCommError)
    assert issubclass(socketcomm.SocketCommError, Exception)
    assert socketcomm.ConnectionClosedError.__module__ == "socketcomm"


def test_the_package_exports_what_it_documents() -> None:
    for name in socketcomm.__all__:
        assert hasattr(socketcomm, name), name
    assert socketcomm.__version__ == "0.1.0"
    assert socketcomm.DEFAULT_HOST == "127.0.0.1"
    assert socketcomm.DEFAULT_PORT > 1023
    assert socketcomm.DEFAULT_MAX_FRAME == 16 * 1024 * 1024


def test_ipv6_loopback_works_like_ipv4() -> None:
    if not socket.has_ipv6:
        pytest.skip("this machine has no IPv6")
    with socketcomm.Server("::1", 0, mode="echo") as server:
        host, port = server.address
        assert host == "::1"
        with socketcomm.Client("::1", port, timeout=5) as client:
            assert client.request("over v6") == b"over v6"
            assert client.local_address[0] == "::1"


def test_sending_to_a_connection_that_is_gone_says_so() -> None:
    with socketcomm.Server("127.0.0.1", 0) as server:
        with pytest.raises(socketcomm.ConnectionClosedError, match="no connection 12345"):
            server.send(12345, "anyone?")
        with socketcomm.Client(*server.address):
            connected = server.recv(timeout=5)
            assert isinstance(connected, socketcomm.Connected)
        assert isinstance(server.recv(timeout=5), socketcomm.Disconnected)
        with pytest.raises(socketcomm.ConnectionClosedError):
            server.send(connected.conn_id, "too late")


def test_rust_log_records_reach_python_logging(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="socketcomm"):
        with socketcomm.Server("127.0.0.1", 0) as server:
            with socket.create_connection(server.address) as sock:
                sock.sendall(b"\x89SCM\x01\x01\x00\x00\x00\x00\x10\x00")
                sock.recv(12)
                sock.sendall(b"\x00\x00\x00\x01\x7e")  # an unknown frame type
                sock.settimeout(5)
                while sock.recv(1024):
                    pass
        # Records reach Python through a forwarding thread: give it a moment, with the level
        # still set (Python's logging decides when the record arrives).
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            records = [r for r in caplog.records if r.name.startswith("socketcomm.server")]
            if any("unknown frame type 0x7e" in r.getMessage() for r in records):
                break
            time.sleep(0.02)
        else:
            raise AssertionError(f"no record of the bad frame in {caplog.records}")


def test_stats_count_connections_messages_and_endings() -> None:
    with socketcomm.Server(
        "127.0.0.1", 0, mode="echo", max_connections=2, idle_timeout=0.3
    ) as server:
        assert server.stats()["connections_total"] == 0
        with socketcomm.Client(*server.address, timeout=5) as client:
            for _ in range(10):
                assert client.request(b"0123456789") == b"0123456789"
            with socket.create_connection(server.address) as bad:
                bad.sendall(b"\x89SCM\x01\x01\x00\x00\x00\x00\x10\x00\x00\x00\x00\x01\x7e")
                bad.settimeout(5)
                while bad.recv(1024):
                    pass
            # The server unregisters a connection just after writing its last bytes: the
            # client can see the end a moment before the count does.
            deadline = time.monotonic() + 5
            while server.stats()["connections"] != 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            stats = server.stats()
            assert stats["connections"] == 1
            assert stats["messages_in"] == 10
            assert stats["messages_out"] == 10
            assert stats["bytes_out"] == 10 * (4 + 1 + 4 + 10)
            assert stats["protocol_errors"] == 1
        with socketcomm.Client(*server.address, timeout=5) as idle:
            with pytest.raises(socketcomm.ConnectionClosedError):
                idle.recv()
        stats = server.stats()
        assert stats["connections_total"] == 3
        assert stats["idle_timeouts"] == 1


def test_a_blocking_handler_is_named_in_a_warning_and_the_server_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging
    import time

    caplog.set_level(logging.WARNING, logger="socketcomm")

    def on_message(conn_id: int, data: bytes) -> bytes:
        if data == b"block":
            time.sleep(1.0)
        return data

    server = socketcomm.Server(on_message=on_message, slow_handler=0.3)
    server.start()
    try:
        with socketcomm.Client(*server.address, timeout=10) as slow:
            with socketcomm.Client(*server.address, timeout=10) as other:
                slow.send("block")
                time.sleep(0.1)
                # Another dispatcher thread answers the other connection meanwhile.
                started = time.monotonic()
                for n in range(5):
                    assert other.request(f"meanwhile {n}") == f"meanwhile {n}".encode()
                assert time.monotonic() - started < 0.5
                # The blocked connection's own messages wait for it, in order.
                slow.send("next")
                assert slow.recv() == b"block"
                assert slow.recv() == b"next"
    finally:
        server.close()
    warnings = [r.getMessage() for r in caplog.records if "slow_handler" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "on_message handler for connection 1 has run for" in warnings[0]
