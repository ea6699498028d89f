"""Shared fixtures: servers on ephemeral loopback ports, and helpers to run the scripts as real
subprocesses."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

import socketcomm
from socketcomm.testing import RedisServer

ROOT = Path(__file__).resolve().parent.parent
ORIGINALS = Path(__file__).resolve().parent / "originals"

# Senders keep their resume tokens here, not in the user's cache folder (the scripts the tests
# start inherit it, so that a sender started again resumes as a user's program would).
os.environ["SOCKETCOMM_RESUME_DIR"] = tempfile.mkdtemp(prefix="socketcomm-resume-")


def until(condition: Callable[[], bool], limit: float = 5) -> None:
    """Waits (bounded) until `condition()` holds; fails the test when it does not in time."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        time.sleep(0.01)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """Exactly `n` bytes from a plain socket; fails the test if the connection ends first."""
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "the connection ended early"
        data += chunk
    return data


def echo_under_backpressure(address: tuple[str, int], size: int = 4 << 20) -> None:
    """Sends `size` bytes of a counting pattern from a plain socket that reads nothing for
    half a second, so that an echoing server's answers find its outbound queue full and wait
    for room; then reads them all back and checks that they came whole and in order."""
    pattern = b"".join(i.to_bytes(4, "big") for i in range(size // 4))
    with socket.create_connection(address, timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        failure: list[BaseException] = []

        def send() -> None:
            try:
                sock.sendall(pattern)
            except OSError as e:
                failure.append(e)

        sender = threading.Thread(target=send)
        sender.start()
        time.sleep(0.5)
        echoed = recv_exactly(sock, len(pattern))
        sender.join(timeout=10)
    assert not failure, failure
    assert echoed == pattern, "the answers came back whole and in order"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real Redis (Debian's redis-server, which scripts/test.sh installs). Skipped, saying
    why, only where it is not installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        reason = "redis-server is not installed (apt-get install redis-server)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; scripts/test.sh installs it")
        pytest.skip(reason)
    redis = RedisServer(binary, tmp_path)
    yield redis
    redis.stop()


@pytest.fixture
def echo_server(socketcomm_server_factory: Callable[..., socketcomm.Server]) -> socketcomm.Server:
    """A native echo server, from the fixtures the package ships for pytest (socketcomm.testing)."""
    return socketcomm_server_factory(mode="echo")


class ReplyingServer:
    """A server in events mode whose pull loop, on a thread, answers ``b"got " + data`` and
    records every event."""

    def __init__(self, **options: object) -> None:
        self.server = socketcomm.Server("127.0.0.1", 0, **options)  # type: ignore[arg-type]
        self.events: list[socketcomm.Event] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        for event in self.server:
            self.events.append(event)
            if isinstance(event, socketcomm.Message):
                # A client may leave before its answer.
                with contextlib.suppress(socketcomm.ConnectionClosedError):
                    event.reply(b"got " + event.data)

    @property
    def address(self) -> tuple[str, int]:
        return self.server.address

    def close(self) -> None:
        self.server.close()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()


@pytest.fixture
def replying_server() -> Iterator[ReplyingServer]:
    server = ReplyingServer()
    yield server
    server.close()


def script_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("SOCKETCOMM_HOST", None)
    env.pop("SOCKETCOMM_PORT", None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run(args: list[str], timeout: float = 30, /, **env: str) -> subprocess.CompletedProcess[str]:
    """Runs a command to completion, from the repository root."""
    return subprocess.run(
        args,
        cwd=ROOT,
        env=script_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def script_server(
    code: str, *args: str, prefix: Sequence[str] = ()
) -> tuple[subprocess.Popen[str], int]:
    """Runs ``python -c code *args`` (after ``prefix``, such as ``ip netns exec NAME``), a server
    that prints its port on the first line; returns the process and the port."""
    process = subprocess.Popen(
        [*prefix, sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        text=True,
        env=script_env(),
    )
    assert process.stdout is not None
    return process, int(process.stdout.readline())


def stop_script(process: subprocess.Popen[str], how: int = signal.SIGKILL) -> None:
    """Stops a process from `script_server` with signal ``how`` and closes its output."""
    if process.poll() is None:
        process.send_signal(how)
    process.wait(10)
    if process.stdout is not None:
        process.stdout.close()


class Background:
    """A long-running process (a server) whose output is read as it comes."""

    def __init__(
        self, args: list[str], *, stdin: bool = False, env: dict[str, str] | None = None
    ) -> None:
        self.process = subprocess.Popen(
            args,
            cwd=ROOT,
            env=script_env(**(env or {})),
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def send_line(self, line: str) -> None:
        """Writes one line to the process's standard input."""
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def wait_for_line(self, stream: str, pattern: str, timeout: float = 20) -> re.Match[str]:
        """Reads `stream` ("stdout" or "stderr") until a line matches `pattern`."""
        pipe = getattr(self.process, stream)
        found: list[re.Match[str]] = []
        seen: list[str] = []

        def read() -> None:
            for line in pipe:
                seen.append(line)
                match = re.search(pattern, line)
                if match:
                    found.append(match)
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        if not found:
            self.stop()
            raise AssertionError(f"no line matching {pattern!r} in {stream}: {seen!r}")
        return found[0]

    def stop(self, timeout: float = 10) -> tuple[int, str, str]:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            out, err = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, err = self.process.communicate()
        return self.process.returncode, out, err


class ServerProcess(Background):
    """``python server.py ...`` on an ephemeral port."""

    def __init__(self, *args: str, script: str = "server.py", **env: str) -> None:
        super().__init__([sys.executable, script, "--port", "0", *args], env=env)
        match = self.wait_for_line("stderr", r"listening on ([\d.]+):(\d+)")
        self.host = match.group(1)
        self.port = int(match.group(2))


@pytest.fixture
def server_process() -> Iterator[ServerProcess]:
    process = ServerProcess()
    yield process
    process.stop()
