"""A bad network, two ways: an impairment proxy (latency, writes sliced into 1-byte segments,
stalls, resets in the middle of a frame or a file), and, where the machine allows it, a network
namespace whose link is shaped to a low rate with a short queue (tbf). Messages and files must
still arrive verified, and timeouts must behave as documented. Also: the server killed in the
middle of a transfer."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest
from impair import Proxy, Toxics

import socketcomm

from conftest import script_server, stop_script


def digest(path: Path) -> str:
    return blake3.blake3(path.read_bytes()).hexdigest()


@pytest.fixture
def uploads(tmp_path: Path) -> Path:
    folder = tmp_path / "uploads"
    folder.mkdir()
    return folder


@pytest.fixture
def echo_with_uploads(uploads: Path) -> Iterator[socketcomm.Server]:
    with socketcomm.Server(mode="echo", upload_dir=uploads) as server:
        yield server


def proxied(server: socketcomm.Server, toxics: Toxics) -> Proxy:
    return Proxy(server.address, toxics)


def test_messages_and_a_file_through_latency(
    echo_with_uploads: socketcomm.Server, uploads: Path, tmp_path: Path
) -> None:
    proxy = proxied(echo_with_uploads, Toxics(latency=0.02))
    source = tmp_path / "file.bin"
    source.write_bytes(os.urandom(3 << 20))
    try:
        with socketcomm.Client(*proxy.address, timeout=10) as client:
            started = time.monotonic()
            assert client.request("delayed") == b"delayed"
            assert time.monotonic() - started >= 0.04  # there and back
            payloads = [os.urandom(n) for n in (1, 1000, 100_000)]
            for payload in payloads:
                client.send(payload)
            assert [client.recv() for _ in payloads] == payloads
            sent = client.send_file(source)
    finally:
        proxy.close()
    assert sent.digest == digest(source) == digest(uploads / "file.bin")


def test_messages_and_a_file_in_one_byte_segments(
    echo_with_uploads: socketcomm.Server, uploads: Path, tmp_path: Path
) -> None:
    proxy = proxied(echo_with_uploads, Toxics(slice=1))
    source = tmp_path / "small.bin"
    source.write_bytes(os.urandom(6000))
    try:
        # The hello, every frame header and every payload arrive one byte at a time.
        with socketcomm.Client(*proxy.address, timeout=20) as client:
            for n in range(5):
                payload = os.urandom(200 + n)
                assert client.request(payload) == payload
            sent = client.send_file(source)
    finally:
        proxy.close()
    assert sent.digest == digest(source) == digest(uploads / "small.bin")


def test_a_reset_in_the_middle_of_a_frame(echo_with_uploads: socketcomm.Server) -> None:
    # The hello is 12 bytes and the frame header 5: the reset cuts the payload.
    proxy = proxied(echo_with_uploads, Toxics(reset_after=12 + 5 + 5000, direction="upstream"))
    try:
        with socketcomm.Client(*proxy.address, timeout=10) as client:
            started = time.monotonic()
            with pytest.raises(socketcomm.ConnectionClosedError) as error:
                client.request(b"x" * 100_000)
            assert time.monotonic() - started < 5
            assert "reset" in str(error.value) or "closed" in str(error.value)
    finally:
        proxy.close()
    assert proxy.resets == 1
    # The server counted it and serves everyone else.
    deadline = time.monotonic() + 5
    while echo_with_uploads.stats()["connection_errors"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert echo_with_uploads.stats()["connection_errors"] >= 1
    with socketcomm.Client(*echo_with_uploads.address, timeout=10) as client:
        assert client.request("fine") == b"fine"


def test_a_reset_in_the_middle_of_a_file_then_a_resume(
    echo_with_uploads: socketcomm.Server, uploads: Path, tmp_path: Path
) -> None:
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(8 << 20))
    proxy = proxied(echo_with_uploads, Toxics(reset_after=3 << 20, direction="upstream"))
    try:
        with socketcomm.Client(*proxy.address, timeout=10) as client:
            with pytest.raises(socketcomm.ConnectionClosedError):
                client.send_file(source, timeout=20)
    finally:
        proxy.close()
    assert not (uploads / "big.bin").exists()
    # The resume finds the partial file once the server has seen the reset (a sender that is
    # quicker than that waits up to 2 s for it, then starts afresh: correct, but no resume).
    deadline = time.monotonic() + 10
    while echo_with_uploads.connections and time.monotonic() < deadline:
        time.sleep(0.01)
    with socketcomm.Client(*echo_with_uploads.address, timeout=10) as client:
        sent = client.send_file(source)
    assert 0 < sent.resumed_from <= 3 << 20
    assert sent.digest == digest(source) == digest(uploads / "big.bin")


def test_a_stalled_server_gives_timeout_error_and_no_loss(
    echo_with_uploads: socketcomm.Server,
) -> None:
    # Answers stop after the hello and the first reply (12 + 5 + 9 + 5 bytes).
    proxy = proxied(echo_with_uploads, Toxics(stall_after=12 + 9 + 5, direction="downstream"))
    try:
        with socketcomm.Client(*proxy.address, timeout=0.5) as client:
            assert client.request("first") == b"first"
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                client.request("second")
            assert 0.45 < time.monotonic() - started < 3
            # A send only queues: it does not wait for the stalled peer (until the queue fills).
            client.send("queued")
    finally:
        proxy.close()


def test_a_stalled_client_is_dropped_by_idle_timeout() -> None:
    with socketcomm.Server(mode="echo", idle_timeout=0.5) as server:
        proxy = proxied(server, Toxics(stall_after=12 + 5 + 2, direction="upstream"))
        try:
            with socketcomm.Client(*proxy.address, timeout=10) as client:
                client.send("stuck")  # its frame never arrives whole
                with pytest.raises(socketcomm.ConnectionClosedError) as error:
                    client.recv()
                assert error.value.code == 1006
        finally:
            proxy.close()
        assert server.stats()["idle_timeouts"] == 1


KILLABLE_SERVER = """
import sys, socketcomm
server = socketcomm.Server("127.0.0.1", 0, upload_dir=sys.argv[1], recv_buffer=65536)
print(server.address[1], flush=True)
for event in server:
    pass
"""


def test_the_server_killed_mid_transfer(tmp_path: Path, uploads: Path) -> None:
    source = tmp_path / "large.bin"
    source.write_bytes(os.urandom(1 << 20) * 256)
    server, port = script_server(KILLABLE_SERVER, str(uploads))
    reports: list[int] = []

    def kill_once_flowing(done: int, total: int) -> None:
        reports.append(done)
        if done and server.poll() is None:
            server.send_signal(signal.SIGKILL)

    try:
        with socketcomm.Client("127.0.0.1", port, timeout=10, send_buffer=65536) as client:
            started = time.monotonic()
            with pytest.raises(socketcomm.ConnectionClosedError):
                client.send_file(source, progress=kill_once_flowing)
            assert time.monotonic() - started < 10
    finally:
        stop_script(server)
    assert reports and reports[-1] < source.stat().st_size
    assert not (uploads / "large.bin").exists()


def can_make_namespaces() -> str | None:
    """Why shaped-link tests cannot run here, or None when they can."""
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = subprocess.run(["ip", "netns", "add", "socketcomm-probe"], capture_output=True)
    if probe.returncode != 0:
        return f"ip netns add failed: {probe.stderr.decode().strip()}"
    subprocess.run(["ip", "netns", "del", "socketcomm-probe"], capture_output=True)
    return None


NAMESPACE_SKIP = can_make_namespaces()


# 8 Mbit/s, a 16 KiB burst, and at most 20 ms of queue: beyond it, packets are dropped.
SHAPE = ["root", "tbf", "rate", "8mbit", "burst", "16kb", "latency", "20ms"]


@pytest.fixture
def shaped_link() -> Iterator[str]:
    """A namespace at 10.77.0.2 behind a veth pair whose link is shaped to 8 Mbit/s with a
    short queue (tbf), both directions; yields the namespace's name."""
    name = f"sc{os.getpid() % 100000}"
    outside, inside = f"{name}a", f"{name}b"
    commands = [
        ["ip", "netns", "add", name],
        ["ip", "link", "add", outside, "type", "veth", "peer", "name", inside],
        ["ip", "link", "set", inside, "netns", name],
        ["ip", "addr", "add", "10.77.0.1/24", "dev", outside],
        ["ip", "link", "set", outside, "up"],
        ["ip", "netns", "exec", name, "ip", "addr", "add", "10.77.0.2/24", "dev", inside],
        ["ip", "netns", "exec", name, "ip", "link", "set", inside, "up"],
        ["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"],
        ["tc", "qdisc", "add", "dev", outside, *SHAPE],
        ["ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", inside, *SHAPE],
    ]
    try:
        for command in commands:
            subprocess.run(command, check=True, capture_output=True)
        yield name
    finally:
        subprocess.run(["ip", "link", "del", outside], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


SHAPED_SERVER = """
import sys, socketcomm
server = socketcomm.Server("10.77.0.2", 0, mode="echo", upload_dir=sys.argv[1])
print(server.address[1], flush=True)
server.serve_forever()
"""


@pytest.mark.skipif(NAMESPACE_SKIP is not None, reason=NAMESPACE_SKIP or "")
def test_messages_and_a_file_over_a_slow_shaped_link(
    shaped_link: str, uploads: Path, tmp_path: Path
) -> None:
    source = tmp_path / "shaped.bin"
    source.write_bytes(os.urandom(2 << 20))
    namespace = ["ip", "netns", "exec", shaped_link]
    server, port = script_server(SHAPED_SERVER, str(uploads), prefix=namespace)
    try:
        with socketcomm.Client("10.77.0.2", port, timeout=30) as client:
            payloads = [os.urandom(n) for n in (10, 50_000, 500_000)]
            for payload in payloads:
                assert client.request(payload) == payload
            started = time.monotonic()
            sent = client.send_file(source)
            elapsed = time.monotonic() - started
    finally:
        stop_script(server, signal.SIGINT)
    assert sent.digest == digest(source) == digest(uploads / "shaped.bin")
    # 2 MiB over 8 Mbit/s takes about 2 s: the link, not loopback, carried it.
    assert elapsed > 1.5, elapsed
