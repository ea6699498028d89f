"""Bad input and failures: each gets a precise error, and the server keeps serving the others."""

from __future__ import annotations

import errno
import socket
import struct
import threading
import time

import pytest

import socketcomm

from conftest import ReplyingServer

MAGIC = b"\x89SCM"


def hello(max_frame: int = 1 << 20, low: int = 1, high: int = 1) -> bytes:
    return MAGIC + bytes([low, high]) + b"\0\0" + struct.pack(">I", max_frame)


def read_all(sock: socket.socket) -> bytes:
    sock.settimeout(5)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def assert_still_serving(server: ReplyingServer) -> None:
    with socketcomm.Client(*server.address, timeout=5) as client:
        assert client.request("still there?") == b"got still there?"


def test_an_oversized_message_is_refused_before_sending() -> None:
    with socketcomm.Server("127.0.0.1", 0, mode="echo", max_frame=1024) as server:
        with socketcomm.Client(*server.address, timeout=5) as client:
            with pytest.raises(socketcomm.FrameTooLargeError, match="exceeds max_frame of 1024"):
                client.send(b"x" * 2000)
            with pytest.raises(ValueError):  # FrameTooLargeError is also a ValueError
                client.request(b"x" * 2000)
            # Nothing was sent: the connection goes on.
            assert client.request(b"x" * 1000) == b"x" * 1000


def test_an_oversized_length_prefix_closes_that_connection_with_a_reason(
    replying_server: ReplyingServer,
) -> None:
    with socket.create_connection(replying_server.address) as sock:
        sock.sendall(hello())
        sock.sendall(struct.pack(">IB", 0xFFFF_FFF0, 1))
        answer = read_all(sock)
    assert answer[:4] == MAGIC
    length, kind, code = struct.unpack(">IBH", answer[12:19])
    assert kind == 0x30  # close
    assert code == 1004  # frame too large
    assert b"exceeds max_frame of 16777216" in answer[19 : 12 + 4 + length]
    assert_still_serving(replying_server)


def test_garbage_after_the_magic_is_refused(replying_server: ReplyingServer) -> None:
    with socket.create_connection(replying_server.address) as sock:
        sock.sendall(MAGIC + b"\xff\x00garbage!")
        answer = read_all(sock)
    assert answer[:4] == MAGIC
    assert answer[4] == 0, "version 0: refused"
    assert b"bad hello" in answer
    assert_still_serving(replying_server)


def test_garbage_instead_of_a_hello_from_the_server_is_a_protocol_error() -> None:
    listener = socket.create_server(("127.0.0.1", 0))

    def answer_with_garbage() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            time.sleep(0.5)

    threading.Thread(target=answer_with_garbage, daemon=True).start()
    with listener, pytest.raises(socketcomm.ProtocolError, match="raw=True"):
        socketcomm.Client(*listener.getsockname()[:2], connect_timeout=5)


def test_a_client_that_closes_mid_frame_is_reported(replying_server: ReplyingServer) -> None:
    with socket.create_connection(replying_server.address) as sock:
        sock.sendall(hello())
        sock.recv(12)
        sock.sendall(struct.pack(">IB", 100, 1) + b"only part")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        gone = [e for e in replying_server.events if isinstance(e, socketcomm.Disconnected)]
        if gone:
            break
        time.sleep(0.01)
    assert "middle of a frame" in gone[0].reason
    assert_still_serving(replying_server)


def test_invalid_utf8_from_a_raw_client_arrives_intact(replying_server: ReplyingServer) -> None:
    with socket.create_connection(replying_server.address) as sock:
        sock.sendall(b"caf\xe9 \xff")
        sock.settimeout(5)
        assert sock.recv(1024) == b"got caf\xe9 \xff"
    message = next(e for e in replying_server.events if isinstance(e, socketcomm.Message))
    assert message.data == b"caf\xe9 \xff"
    with pytest.raises(ValueError, match="not valid UTF-8"):
        _ = message.text
    assert_still_serving(replying_server)


def test_a_reset_while_replying_leaves_the_server_serving() -> None:
    with socketcomm.Server("127.0.0.1", 0) as server:
        sock = socket.create_connection(server.address)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.sendall(b"hi")
        assert isinstance(server.recv(timeout=5), socketcomm.Connected)
        message = server.recv(timeout=5)
        assert isinstance(message, socketcomm.Message)
        sock.close()  # linger 0: a reset
        time.sleep(0.1)
        try:
            for _ in range(50):
                message.reply(b"x" * 65536)
        except socketcomm.ConnectionClosedError as e:
            assert "closed" in str(e) or "reset" in str(e)
        gone = server.recv(timeout=5)
        assert isinstance(gone, socketcomm.Disconnected)
        with socketcomm.Client(*server.address, timeout=5) as client:
            client.send("next")
            assert isinstance(server.recv(timeout=5), socketcomm.Connected)
            assert isinstance(server.recv(timeout=5), socketcomm.Message)


def test_connecting_to_a_closed_port_is_refused() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ConnectionRefusedError, match="is the server running") as caught:
        socketcomm.Client("127.0.0.1", port)
    assert caught.value.errno == errno.ECONNREFUSED


def test_recv_on_a_closed_client_raises_connection_closed(echo_server: socketcomm.Server) -> None:
    client = socketcomm.Client(*echo_server.address)
    client.close()
    client.close()  # idempotent
    with pytest.raises(socketcomm.ConnectionClosedError, match="create a new Client"):
        client.recv()
    with pytest.raises(ConnectionError):
        client.send("x")


def test_binding_a_port_in_use_is_a_clear_os_error() -> None:
    with socketcomm.Server("127.0.0.1", 0) as first:
        with pytest.raises(OSError, match="another program is using that port") as caught:
            socketcomm.Server(*first.address)
    assert caught.value.errno == errno.EADDRINUSE


def test_a_client_waiting_when_the_server_closes_learns_why() -> None:
    server = socketcomm.Server("127.0.0.1", 0)
    client = socketcomm.Client(*server.address, timeout=10)
    threading.Timer(0.2, server.close).start()
    with pytest.raises(socketcomm.ConnectionClosedError, match="shutting down") as caught:
        client.recv()
    assert caught.value.code == 1001
    assert "shutting down" in caught.value.reason
    client.close()


def test_a_timed_out_recv_loses_no_message(replying_server: ReplyingServer) -> None:
    with socketcomm.Client(*replying_server.address) as client:
        with pytest.raises(TimeoutError, match=r"within 0\.200 s"):
            client.recv(timeout=0.2)
        client.send("late")
        assert client.recv(timeout=5) == b"got late"


def test_a_request_timeout_names_the_server() -> None:
    with socketcomm.Server("127.0.0.1", 0) as server:  # events mode, nobody answers
        with socketcomm.Client(*server.address, timeout=0.3) as client:
            with pytest.raises(TimeoutError, match=f"no reply from 127.0.0.1:{server.address[1]}"):
                client.request("anyone?")


def test_an_unresolvable_host_is_an_os_error() -> None:
    with pytest.raises(OSError, match="cannot resolve host"):
        socketcomm.Client("no-such-host.invalid", 80, connect_timeout=5)


def test_a_send_to_a_server_that_stops_reading_times_out() -> None:
    # Nobody reads the events, and the queue holds one: the server stops reading, the socket
    # buffers fill, then the client's own queue.
    server = socketcomm.Server("127.0.0.1", 0, event_queue=1)
    client = socketcomm.Client(*server.address, timeout=0.5)
    payload = b"s" * 60000
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="no room to send"):
        for _ in range(5000):
            client.send(payload)
    assert time.monotonic() - started < 30
    with pytest.raises(TimeoutError):
        client.send(payload, timeout=0.1)
    server.close(timeout=0.5)  # the stuck connection is dropped after half a second
    client.close()
