"""Socket options, each observed on the real socket with getsockopt, or by its behaviour."""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import socketcomm


@contextmanager
def inspect(fileno: int) -> Iterator[socket.socket]:
    """A socket object on a duplicate of `fileno`, to read its options."""
    sock = socket.socket(fileno=os.dup(fileno))
    try:
        yield sock
    finally:
        sock.close()


def test_client_socket_options_are_set() -> None:
    with socketcomm.Server("127.0.0.1", 0, mode="echo") as server:
        with socketcomm.Client(
            *server.address,
            keepalive=7,
            keepalive_interval=3,
            keepalive_count=4,
            recv_buffer=65536,
            send_buffer=131072,
            linger=0,
        ) as client:
            assert client.request("ok") == b"ok"
            with inspect(client.fileno()) as sock:
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 7
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 3
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 4
                # Linux doubles the size asked for (room for its bookkeeping).
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= 65536
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= 131072
                linger = sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)
                assert struct.unpack("ii", linger) == (1, 0)


def test_defaults_leave_keepalive_off_and_nodelay_on() -> None:
    with socketcomm.Server("127.0.0.1", 0, mode="echo") as server:
        with socketcomm.Client(*server.address, nodelay=True) as client:
            with inspect(client.fileno()) as sock:
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
        with socketcomm.Client(*server.address, nodelay=False) as client:
            with inspect(client.fileno()) as sock:
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0


def test_listener_options_and_reuse_port() -> None:
    with socketcomm.Server("127.0.0.1", 0, mode="echo", reuse_port=True, recv_buffer=262144) as a:
        with inspect(a.fileno()) as sock:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= 262144
        # A second server on the same port: allowed with reuse_port on both.
        with socketcomm.Server(*a.address, mode="echo", reuse_port=True) as b:
            assert b.address == a.address
            with socketcomm.Client(*a.address, timeout=5) as client:
                assert client.request("either") == b"either"
    with socketcomm.Server("127.0.0.1", 0) as c:
        with pytest.raises(OSError, match="another program is using that port"):
            socketcomm.Server(*c.address, reuse_port=True)


def test_a_dual_stack_server_is_reached_over_ipv4_and_ipv6() -> None:
    if not socket.has_ipv6:
        pytest.skip("this machine has no IPv6")
    with socketcomm.Server("::", 0, mode="echo") as server:
        port = server.address[1]
        with socketcomm.Client("127.0.0.1", port, timeout=5) as over_v4:
            assert over_v4.request("v4") == b"v4"
        with socketcomm.Client("::1", port, timeout=5) as over_v6:
            assert over_v6.request("v6") == b"v6"


def test_a_client_can_bind_its_local_address() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    with socketcomm.Server("127.0.0.1", 0) as server:
        with socketcomm.Client(*server.address, local_address=("127.0.0.1", free_port)) as client:
            assert client.local_address == ("127.0.0.1", free_port)
            connected = server.recv(timeout=5)
            assert isinstance(connected, socketcomm.Connected)
            assert connected.peer == ("127.0.0.1", free_port)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"keepalive": -1}, "invalid keepalive"),
        ({"keepalive": 0.5}, "invalid keepalive"),
        ({"keepalive_count": 3}, "need keepalive=SECONDS"),
        ({"keepalive": 5, "keepalive_count": 0}, "invalid keepalive_count"),
        ({"recv_buffer": 10}, "invalid recv_buffer"),
        ({"send_buffer": 10}, "invalid send_buffer"),
        ({"linger": -2}, "invalid linger"),
    ],
)
def test_invalid_values_are_refused_naming_the_option(
    options: dict[str, float], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        socketcomm.Server("127.0.0.1", 0, **options)  # type: ignore[arg-type]
    with socketcomm.Server("127.0.0.1", 0, mode="echo") as server:
        with pytest.raises(ValueError, match=message):
            socketcomm.Client(*server.address, **options)  # type: ignore[arg-type]


def test_workers_open_listeners_that_share_the_port() -> None:
    with socketcomm.Server("127.0.0.1", 0, mode="echo", workers=3) as server:
        with inspect(server.fileno()) as sock:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        port = server.address[1]
        listening = [
            line
            for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
            if line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A"
        ]
        assert len(listening) == 3, "three listening sockets on the port"
        clients = [socketcomm.Client(*server.address, timeout=5) for _ in range(30)]
        for n, client in enumerate(clients):
            assert client.request(f"{n}") == f"{n}".encode()
        for client in clients:
            client.close()
    with pytest.raises(ValueError, match="invalid workers"):
        socketcomm.Server("127.0.0.1", 0, workers=0)


def _timer_of_server_side(port: int, peer_port: int) -> str:
    """The `tr` column of /proc/net/tcp for the server's end of an idle connection: 02 is the
    keepalive timer, 00 none (01, retransmission, shows while data is in flight: wait)."""
    deadline = time.monotonic() + 5
    while True:
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1].endswith(f":{port:04X}") and fields[2].endswith(f":{peer_port:04X}"):
                timer = fields[5].split(":")[0]
                break
        else:
            raise AssertionError("no such connection")
        if timer != "01" or time.monotonic() > deadline:
            return timer
        time.sleep(0.05)


def test_server_connections_get_keepalive_timers() -> None:
    with socketcomm.Server("127.0.0.1", 0, mode="echo", keepalive=30) as kept:
        with socketcomm.Client(*kept.address) as client:
            assert client.request("x") == b"x"
            timer = _timer_of_server_side(kept.address[1], client.local_address[1])
            assert timer == "02", "an idle connection with keepalive runs the keepalive timer"
    with socketcomm.Server("127.0.0.1", 0, mode="echo") as plain:
        with socketcomm.Client(*plain.address) as client:
            assert client.request("x") == b"x"
            assert _timer_of_server_side(plain.address[1], client.local_address[1]) == "00"
