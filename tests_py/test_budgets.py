"""No client takes more than its share: what a peer can make the server hold is bounded, and
the bound holds before the resource is taken. Each server runs in a process of its own, so
that its memory can be measured (and limited) from the outside."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import socketcomm
import socketcomm.aio as aio

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


@contextlib.contextmanager
def process_serving(code: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """Runs `code`, a server that prints its port and serves until its standard input closes;
    yields the process and the port."""
    server = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None and server.stdin is not None
    try:
        yield server, int(server.stdout.readline())
    finally:
        server.stdin.close()
        server.wait(timeout=20)
        server.stdout.close()


def hello(max_frame: int = MiB) -> bytes:
    return MAGIC + bytes([1, 1]) + b"\0\0" + struct.pack(">I", max_frame)


def test_a_frame_announced_is_not_reserved_before_it_arrives() -> None:
    # 300 connections each announcing a 16 MiB frame and sending 5 bytes of it would take
    # 4.8 GB if each promise were reserved; under the 1 GiB limit the server used to abort
    # ("memory allocation of 16777220 bytes failed").
    attackers: list[socket.socket] = []
    with process_serving(LIMITED_SERVER) as (server, port):
        try:
            before = rss_bytes(server.pid)
            for _ in range(300):
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                sock.sendall(hello() + struct.pack(">I", 16 * MiB) + b"\x01")
                attackers.append(sock)
            for sock in attackers:
                assert len(sock.recv(12)) == 12  # each hello was answered: all was read
            time.sleep(0.3)  # and the frame starts after them
            with socketcomm.Client("127.0.0.1", port, timeout=10) as honest:
                assert honest.request(b"still serving") == b"still serving"
            assert server.poll() is None, "the server died"
            grown = rss_bytes(server.pid) - before
            assert grown < 64 * MiB, f"RSS grew by {grown / MiB:.1f} MiB for 300 x 5 bytes"
        finally:
            for sock in attackers:
                sock.close()


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


def own_rss() -> int:
    return rss_bytes(os.getpid())


def test_close_keeps_backpressure_and_honours_its_timeout() -> None:
    # A thread sends 64 KiB messages to a client that never reads: it is held back. Once
    # close() starts, its sends used to be accepted again (82 MB to 1.33 GB in a second) and
    # close(timeout=1) returned only when the producer stopped.
    # slow_reader="wait": the producer is held back for as long as the client stays.
    server = socketcomm.Server("127.0.0.1", 0, slow_reader="wait")
    sock = socket.create_connection(server.address, timeout=10)
    try:
        sock.sendall(b"a plain client that will never read")
        message = server.recv(timeout=10)
        while not isinstance(message, socketcomm.Message):
            message = server.recv(timeout=10)
        outcome: list[BaseException] = []

        def produce() -> None:
            try:
                for _ in range(100_000):
                    server.send(message.conn_id, b"x" * 65536)
            except BaseException as e:  # the test reports what ended it
                outcome.append(e)

        producer = threading.Thread(target=produce)
        producer.start()
        time.sleep(0.5)  # the queue and the socket buffers fill, then the producer waits
        before = own_rss()
        started = time.monotonic()
        server.close(timeout=1)
        took = time.monotonic() - started
        producer.join(10)
        assert not producer.is_alive(), "the producer was never told the connection ended"
        assert took < 3, f"close(timeout=1) took {took:.1f} s"
        assert outcome and isinstance(outcome[0], socketcomm.ConnectionClosedError), outcome
        grown = own_rss() - before
        assert grown < 200 * MiB, f"RSS grew by {grown / MiB:.0f} MiB during close"
    finally:
        sock.close()
        server.close()


def test_slow_readers_of_a_broadcast_cost_one_grace_period_together() -> None:
    # Ten clients that never read: each was given a second's grace after the one before, so
    # an honest reader waited ten seconds for what followed.
    with socketcomm.Server(mode="broadcast", outbound_queue=16) as server:
        slow = []
        for _ in range(10):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(server.address)
            sock.sendall(hello())  # framed, and then it never reads
            slow.append(sock)
        fast = socketcomm.Client(*server.address, timeout=20)
        talker = socketcomm.Client(*server.address, timeout=20)
        try:
            deadline = time.monotonic() + 10
            while len(server.connections) < 12:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            payload = b"z" * 16384
            started = time.monotonic()
            for _ in range(300):  # 4.8 MiB: more than each slow reader's buffers hold
                talker.send(payload)
            talker.send(b"done")
            received = 0
            while fast.recv() != b"done":
                received += 1
            took = time.monotonic() - started
            assert received == 300, "the honest reader lost nothing"
            assert took < 6, f"the honest reader waited {took:.1f} s"
            assert server.stats()["slow_readers"] == 10
        finally:
            for sock in slow:
                sock.close()
            fast.close()
            talker.close()


def request_frame(n: int, body: bytes) -> bytes:
    return struct.pack(">IBI", 5 + len(body), 2, n) + body


def test_clients_that_never_read_their_replies_cannot_hold_the_handler_threads() -> None:
    # Each request of 100 B gets a 100 KB answer that these clients never read: every
    # dispatcher thread used to wait in reply() for as long as they stayed, and honest
    # requests (and new clients) timed out.
    server = socketcomm.Server(
        "127.0.0.1", 0, on_message=lambda conn, data: data * 1000, outbound_queue=16
    )
    server.start()
    greedy = []
    try:
        for _ in range(6):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(server.address)
            sock.sendall(hello() + b"".join(request_frame(n, b"r" * 100) for n in range(400)))
            greedy.append(sock)
        time.sleep(0.5)
        with socketcomm.Client(*server.address, timeout=10) as honest:
            for _ in range(5):
                assert honest.request(b"x") == b"x" * 1000
        deadline = time.monotonic() + 10
        while server.stats()["slow_readers"] < 6:
            assert time.monotonic() < deadline, server.stats()
            time.sleep(0.05)
    finally:
        for sock in greedy:
            sock.close()
        server.close()


def file_offer(transfer: int, size: int, name: str) -> bytes:
    body = struct.pack(">BIQB", 0x10, transfer, size, 0) + name.encode()
    return struct.pack(">I", len(body)) + body


def test_a_flood_of_file_offers_makes_the_next_upload_busy_not_stuck(tmp_path: Path) -> None:
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    source = tmp_path / "honest.txt"
    source.write_bytes(b"twelve bytes")
    with socketcomm.Server(mode="echo", upload_dir=uploads) as server:
        floods = []
        try:
            # 16 connections x 4 offers that never send a byte: every place in the folder.
            for n in range(16):
                sock = socket.create_connection(server.address, timeout=10)
                offers = b"".join(file_offer(t, 10, f"flood-{n}-{t}") for t in range(4))
                sock.sendall(hello() + offers)
                floods.append(sock)
            time.sleep(0.5)
            with socketcomm.Client(*server.address, timeout=10) as client:
                with pytest.raises(socketcomm.TransferError, match="in progress") as refused:
                    client.send_file(source, timeout=10)
                assert refused.value.status == "busy"
            for sock in floods:
                sock.close()
            floods.clear()
            # Their places come back once they are gone.
            deadline = time.monotonic() + 10
            while True:
                with socketcomm.Client(*server.address, timeout=10) as client:
                    try:
                        client.send_file(source, timeout=10)
                        break
                    except socketcomm.TransferError as e:
                        assert e.status == "busy" and time.monotonic() < deadline
                        time.sleep(0.1)
        finally:
            for sock in floods:
                sock.close()
    assert (uploads / "honest.txt").read_bytes() == b"twelve bytes"


PARTIAL_DIR = ".socketcomm-partial"


def test_partial_files_expire_after_partial_ttl(tmp_path: Path) -> None:
    partials = tmp_path / PARTIAL_DIR
    partials.mkdir()
    stale, fresh = partials / ("a" * 32 + ".part"), partials / ("b" * 32 + ".part")
    stale.write_bytes(b"left by an upload two hours ago")
    fresh.write_bytes(b"left a minute ago")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    with socketcomm.Server(mode="echo", upload_dir=tmp_path, partial_ttl=3600):
        assert not stale.exists(), "swept at start"
        assert fresh.exists(), "still within partial_ttl: kept for a resume"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB file system of the test's own (tmpfs), unmounted afterwards."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); needs root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_interrupted_uploads_cannot_fill_the_disk_for_good(
    small_disk: Path, tmp_path: Path
) -> None:
    # Partial files of uploads that were cut off fill the 1 MiB disk; an honest upload used
    # to be refused as no_space for as long as they stayed.
    partials = small_disk / PARTIAL_DIR
    partials.mkdir()
    for n in range(3):
        (partials / (f"{n}" * 32 + ".part")).write_bytes(b"p" * 300_000)
    source = tmp_path / "honest.bin"
    source.write_bytes(os.urandom(400_000))
    with socketcomm.Server(mode="echo", upload_dir=small_disk) as server:
        with socketcomm.Client(*server.address, timeout=10) as client:
            sent = client.send_file(source)
    assert (small_disk / "honest.bin").read_bytes() == source.read_bytes()
    assert sent.size == 400_000
    assert len(list(partials.iterdir())) < 3, "the oldest partial files made room"


DESCRIPTOR_LIMITS = """
import logging, resource, socketcomm
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 512))
socketcomm.Server("127.0.0.1", 0, max_connections=10000).close()
print(resource.getrlimit(resource.RLIMIT_NOFILE))
"""


def test_the_descriptor_limit_is_raised_and_a_low_one_is_said() -> None:
    # Each connection takes a descriptor; many systems start programs at a soft limit of 1,024.
    done = subprocess.run(
        [sys.executable, "-c", DESCRIPTOR_LIMITS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(512, 512)", "the soft limit is raised to the hard one"
    assert "max_connections is 10000, but this process may open only 512" in done.stderr


AMPLIFYING_SERVER = """
import sys, socketcomm
server = socketcomm.Server(
    "127.0.0.1", 0, on_message=lambda conn, data: data * 1000, slow_reader="wait"
)
server.start()
print(server.address[1], flush=True)
sys.stdin.read()
server.close()
"""


def test_answers_that_amplify_are_bounded_in_bytes_not_only_in_messages() -> None:
    # 1,100 requests of 1 KiB, each answered with 1 MB that the client never reads: with a
    # queue bounded in messages only (1,024) that was 1.05 GB of RSS, kept after the client left.
    with process_serving(AMPLIFYING_SERVER) as (server, port):
        before = rss_bytes(server.pid)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as greedy:
            greedy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            requests = b"".join(request_frame(n, b"q" * 1024) for n in range(1100))
            greedy.sendall(hello(max_frame=16 * MiB) + requests)
            time.sleep(3)  # bounded: about 10 MiB here, flat; unbounded: 150 MiB in 2 s
            grown = rss_bytes(server.pid) - before
            assert grown < 48 * MiB, f"RSS grew by {grown / MiB:.0f} MiB"
            with socketcomm.Client("127.0.0.1", port, timeout=10) as honest:
                assert honest.request(b"x") == b"x" * 1000


# A pull-loop server whose application takes nothing until told (a line on its standard
# input), then counts the messages and their bytes.
WAITING_SERVER = """
import sys, socketcomm
server = socketcomm.Server("127.0.0.1", 0, max_buffered=64 << 20)
server.start()
print(server.address[1], flush=True)
sys.stdin.readline()
count = size = 0
for event in server:
    if isinstance(event, socketcomm.Message):
        count += 1
        size += len(event.data)
        if count == int(sys.argv[1]):
            break
print(count, size, flush=True)
sys.stdin.read()
server.close()
"""


def send_in_threads(port: int, clients: int, messages: list[bytes]) -> list[threading.Thread]:
    def send() -> None:
        with socketcomm.Client("127.0.0.1", port, timeout=60) as client:
            for data in messages:
                client.send(data)

    threads = [threading.Thread(target=send, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    return threads


def test_messages_waiting_for_the_application_are_bounded_in_bytes() -> None:
    # 4 clients x 24 messages of 8 MiB (768 MiB) to an application that takes nothing yet:
    # event_queue counts 4,096 events, so they used to be read and held (60 x 16 MiB took a
    # server from 15 MB to 998 MB in 1.5 s). max_buffered (64 MiB here) bounds them in bytes.
    messages = [bytes([n]) * (8 * MiB) for n in range(24)]
    with process_serving(WAITING_SERVER.replace("sys.argv[1]", "96")) as (server, port):
        assert server.stdin is not None and server.stdout is not None
        before = rss_bytes(server.pid)
        senders = send_in_threads(port, 4, messages)
        time.sleep(3)
        grown = rss_bytes(server.pid) - before
        assert grown < 160 * MiB, f"RSS grew by {grown / MiB:.0f} MiB with 64 MiB allowed"
        assert all(sender.is_alive() for sender in senders), "the senders are held back"
        server.stdin.write("take\n")
        server.stdin.flush()
        assert server.stdout.readline().split() == ["96", str(96 * 8 * MiB)], "all arrived"
        for sender in senders:
            sender.join(30)
            assert not sender.is_alive()


# A server whose handler blocks for one connection until told (a line on its standard input).
BLOCKED_HANDLER_SERVER = """
import sys, threading, socketcomm
go = threading.Event()
count = 0
def on_message(conn_id, data):
    global count
    go.wait(60)
    count += 1
    if count == 300:
        print(count, flush=True)
server = socketcomm.Server("127.0.0.1", 0, on_message=on_message, event_queue=16)
server.start()
print(server.address[1], flush=True)
sys.stdin.readline()
go.set()
sys.stdin.read()
server.close()
"""


def test_a_blocked_handler_holds_back_its_own_connection_in_bytes() -> None:
    # The dispatcher's per-connection queues used to keep taking from event_queue while the
    # handler was blocked: 300 x 1 MiB (324 MB) in 1.3 s with event_queue=16. inbound_bytes
    # (4 MiB) bounds what waits for one connection's handler.
    with process_serving(BLOCKED_HANDLER_SERVER) as (server, port):
        assert server.stdin is not None and server.stdout is not None
        before = rss_bytes(server.pid)
        (sender,) = send_in_threads(port, 1, [b"m" * MiB] * 300)
        time.sleep(2)
        grown = rss_bytes(server.pid) - before
        assert grown < 48 * MiB, f"RSS grew by {grown / MiB:.0f} MiB behind a blocked handler"
        assert sender.is_alive(), "the sender is held back"
        with socketcomm.Client("127.0.0.1", port, timeout=10) as other:
            other.send(b"another connection is still read")
        server.stdin.write("go\n")
        server.stdin.flush()
        assert server.stdout.readline().split() == ["300"], "every message was handled"
        sender.join(30)
        assert not sender.is_alive()


# A server with few descriptors; its log goes to its standard error.
FEW_DESCRIPTORS_SERVER = """
import logging, resource, sys, time, socketcomm
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
server = socketcomm.Server("127.0.0.1", 0, mode="echo", max_connections=40)
server.start()
print(server.address[1], flush=True)
sys.stdin.readline()
# The descriptors come back as the server closes what the clients left: try for a while (this
# process's own client needs one too).
deadline = time.monotonic() + 15
while True:
    try:
        with socketcomm.Client("127.0.0.1", server.address[1], timeout=5) as client:
            print(client.request(b"served again").decode(), flush=True)
        break
    except (OSError, socketcomm.SocketCommError) as e:
        if time.monotonic() > deadline:
            print("not served:", repr(e), file=sys.stderr, flush=True)
            break
        time.sleep(0.1)
server.close()
"""


def test_a_failing_accept_is_logged_once_not_ten_times_a_second() -> None:
    # Out of descriptors, accept fails at once every time it is retried (every 100 ms): the
    # log line used to be written each time.
    server = subprocess.Popen(
        [sys.executable, "-c", FEW_DESCRIPTORS_SERVER],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert server.stdin is not None and server.stdout is not None
    clients: list[socket.socket] = []
    try:
        port = int(server.stdout.readline())
        # More than the process may open: the kernel completes the handshakes (the backlog)
        # and the server's accept fails for those it has no descriptor for.
        clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(80)]
        time.sleep(1.5)  # about 15 retries
        for sock in clients:
            sock.close()
        server.stdin.write("go\n")
        server.stdin.flush()
        answer = server.stdout.readline().strip()
        _, log = server.communicate(timeout=30)
        assert answer == "served again", f"accepting resumed: {log}"
    finally:
        for sock in clients:
            sock.close()
        if server.poll() is None:
            server.kill()
            server.communicate()
    failures = [line for line in log.splitlines() if "accept failed" in line]
    assert len(failures) == 1, log
    assert "out of file descriptors" in failures[0]


def test_a_client_that_does_not_read_takes_no_more_than_its_inbound_bytes() -> None:
    messages, size = 48, 1 << 20
    with socketcomm.Server("127.0.0.1", 0, slow_reader="wait") as server:
        with socketcomm.Client(*server.address, inbound_bytes=size, timeout=10) as client:
            conn_id = next(e for e in server if isinstance(e, socketcomm.Connected)).conn_id

            def send_all() -> None:
                for i in range(messages):
                    server.send(conn_id, bytes([i]) * size)

            sender = threading.Thread(target=send_all, daemon=True)
            sender.start()
            written, deadline = -1, time.monotonic() + 5
            while time.monotonic() < deadline:
                time.sleep(0.2)
                now = server.stats()["bytes_out"]
                if now == written:
                    break
                written = now
            # The sockets' buffers hold some megabytes on loopback; without the budget the
            # client's queue took every message.
            assert written < messages * size // 2, (
                f"{written} bytes written to a client that reads nothing"
            )
            for i in range(messages):
                assert client.recv() == bytes([i]) * size, f"message {i}"
            sender.join(10)
            assert not sender.is_alive()


def test_a_request_behind_unread_messages_times_out_saying_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The server pushes 24 x 1 MiB that the client's application does not read, and answers
    # requests: a reply waits behind those messages, as the client reads nothing past its
    # budget (inbound_bytes), and the timeout says so.
    messages, size = 24, 1 << 20

    def serve(server: socketcomm.Server) -> None:
        for event in server:
            if isinstance(event, socketcomm.Connected):
                for _ in range(messages):
                    server.send(event.conn_id, b"p" * size)
            elif isinstance(event, socketcomm.Message):
                with contextlib.suppress(socketcomm.ConnectionClosedError):
                    event.reply(b"got " + event.data)

    with socketcomm.Server("127.0.0.1", 0, slow_reader="wait", handler_threads=1) as server:
        serving = threading.Thread(target=serve, args=(server,), daemon=True)
        serving.start()
        with socketcomm.Client(*server.address, inbound_bytes=size, timeout=10) as client:
            time.sleep(0.5)  # the pushed messages fill the client's budget
            with caplog.at_level(logging.WARNING, logger="socketcomm"):
                with pytest.raises(TimeoutError) as waited:
                    client.request(b"question", timeout=1)
            assert "not read (recv())" in str(waited.value), waited.value
            assert "inbound_bytes" in str(waited.value)
            assert any("not read (recv())" in r.getMessage() for r in caplog.records)
            # Once the application reads, everything arrives, and replies again.
            for _ in range(messages):
                assert client.recv() == b"p" * size
            assert client.request(b"again") == b"got again"

        async def asking_with_asyncio() -> str:
            async with aio.Client(*server.address, inbound_bytes=size) as client:
                await asyncio.sleep(0.5)
                with pytest.raises(TimeoutError) as waited:
                    await client.request(b"question", timeout=1)
                for _ in range(messages):
                    assert await client.recv() == b"p" * size
                assert await client.request(b"again") == b"got again"
                return str(waited.value)

        assert "not read (recv())" in asyncio.run(asking_with_asyncio())
        server.close()
        serving.join(10)
