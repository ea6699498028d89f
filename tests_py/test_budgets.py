"""No client takes more than its share: what a peer can make the server hold is bounded, and
the bound holds before the resource is taken. Each server runs in a process of its own, so
that its memory can be measured (and limited) from the outside."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

import socketcomm

from conftest import ROOT

MAGIC = b"\x89SCM"
MiB = 1 << 20

# An echo server under an address-space limit of what it has at start-up plus 1 GiB; prints
# its port, then serves until its standard input closes.
LIMITED_SERVER = """
import resource, sys, socketcomm
server = socketcomm.Server("127.0.0.1", 0, mode="echo")
server.start()
with open("/proc/self/status") as status:
    size = next(int(l.split()[1]) * 1024 for l in status if l.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (size + (1 << 30), resource.RLIM_INFINITY))
print(server.address[1], flush=True)
sys.stdin.read()
server.close()
"""


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def hello(max_frame: int = MiB) -> bytes:
    return MAGIC + bytes([1, 1]) + b"\0\0" + struct.pack(">I", max_frame)


def test_a_frame_announced_is_not_reserved_before_it_arrives() -> None:
    # 300 connections each announcing a 16 MiB frame and sending 5 bytes of it would take
    # 4.8 GB if each promise were reserved; under the 1 GiB limit the server used to abort
    # ("memory allocation of 16777220 bytes failed").
    server = subprocess.Popen(
        [sys.executable, "-c", LIMITED_SERVER],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None and server.stdin is not None
    attackers: list[socket.socket] = []
    try:
        port = int(server.stdout.readline())
        before = rss_bytes(server.pid)
        for _ in range(300):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(hello() + struct.pack(">I", 16 * MiB) + b"\x01")
            attackers.append(sock)
        for sock in attackers:
            assert len(sock.recv(12)) == 12  # each hello was answered: the server read it all
        time.sleep(0.3)  # and the frame starts after them
        with socketcomm.Client("127.0.0.1", port, timeout=10) as honest:
            assert honest.request(b"still serving") == b"still serving"
        assert server.poll() is None, "the server died"
        grown = rss_bytes(server.pid) - before
        assert grown < 64 * MiB, f"RSS grew by {grown / MiB:.1f} MiB for 300 x 5 bytes"
    finally:
        for sock in attackers:
            sock.close()
        server.stdin.close()
        server.wait(timeout=20)
        server.stdout.close()


def test_silent_connections_cannot_lock_honest_clients_out() -> None:
    # Every slot taken by a connection that never says a word: honest clients are told the
    # server is full, but only until hello_timeout drops the silent ones.
    with socketcomm.Server(mode="echo", max_connections=20, hello_timeout=0.5) as server:
        silent = [socket.create_connection(server.address, timeout=10) for _ in range(20)]
        try:
            time.sleep(0.1)
            with pytest.raises(socketcomm.ConnectionClosedError, match="server full"):
                socketcomm.Client(*server.address, timeout=5)
            deadline = time.monotonic() + 10
            while True:
                try:
                    with socketcomm.Client(*server.address, timeout=5) as honest:
                        assert honest.request(b"in at last") == b"in at last"
                    break
                except socketcomm.ConnectionClosedError:
                    assert time.monotonic() < deadline, "the silent connections stayed"
                    time.sleep(0.1)
            for sock in silent:
                assert sock.recv(16) == b"", "a silent connection was closed"
            assert server.stats()["idle_timeouts"] == 20
        finally:
            for sock in silent:
                sock.close()


def test_one_address_cannot_take_every_slot() -> None:
    with socketcomm.Server(mode="echo", max_connections_per_ip=3) as server:
        clients = [socketcomm.Client(*server.address, timeout=5) for _ in range(3)]
        try:
            with pytest.raises(socketcomm.ConnectionClosedError, match="max_connections_per_ip"):
                socketcomm.Client(*server.address, timeout=5)
            # A plain socket is told in a line of text.
            with socket.create_connection(server.address, timeout=5) as plain:
                plain.sendall(b"hello?")
                assert b"max_connections_per_ip" in plain.recv(1024)
            # The other addresses of this machine are other clients (127.0.0.2 is loopback).
            with socketcomm.Client(
                *server.address, timeout=5, local_address=("127.0.0.2", 0)
            ) as other:
                assert other.request(b"mine") == b"mine"
        finally:
            for client in clients:
                client.close()
