"""The command line and the drop-in scripts, run as real subprocesses."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import sys
import time

import pytest

import socketcomm

from conftest import ORIGINALS, Background, ServerProcess, run

ACK = "Your message has been received, Thank you!"
ORIGINAL_CLIENT = (ORIGINALS / "client.py").read_text()
PEER = r"\('127\.0\.0\.1', \d+\)"


def server_lines(process: ServerProcess, count: int) -> list[str]:
    code, out, err = process.stop()
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == count, out
    return lines


def test_the_original_client_gets_exactly_the_original_answer() -> None:
    process = ServerProcess()
    result = run([sys.executable, str(ORIGINALS / "client.py"), process.host, str(process.port)])
    assert result.returncode == 0, result.stderr
    assert result.stdout == ACK + "\n"
    time.sleep(0.2)
    connected, message, ended = server_lines(process, 3)
    assert re.fullmatch(f"connected to {PEER}", connected)
    assert message == "message from client is Hello World"
    assert re.fullmatch(f"Communication with {PEER} ended!", ended)
    assert connected.removeprefix("connected to ") in ended


def test_client_py_with_no_arguments_does_what_the_original_did() -> None:
    process = ServerProcess()
    result = run([sys.executable, "client.py"], SOCKETCOMM_PORT=str(process.port))
    assert result.returncode == 0, result.stderr
    assert result.stdout == ACK + "\n"
    time.sleep(0.2)
    _, message, ended = server_lines(process, 3)
    assert message == "message from client is Hello World"
    assert ended.startswith("Communication with")


def test_client_py_raw_talks_to_the_original_server() -> None:
    original = Background([sys.executable, str(ORIGINALS / "server.py"), "127.0.0.1", "0"])
    port = original.wait_for_line("stdout", r"listening (\d+)").group(1)
    try:
        result = run([sys.executable, "client.py", "--raw", "--port", port])
        assert result.returncode == 0, result.stderr
        assert result.stdout == ACK + "\n"
    finally:
        original.stop()


def test_client_py_without_raw_against_a_plain_server_says_to_use_raw() -> None:
    original = Background([sys.executable, str(ORIGINALS / "server.py"), "127.0.0.1", "0"])
    port = original.wait_for_line("stdout", r"listening (\d+)").group(1)
    try:
        result = run([sys.executable, "client.py", "--port", port, "--timeout", "5"])
        assert result.returncode == 1
        assert "--raw" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        original.stop()


def test_host_and_port_come_from_the_environment_too() -> None:
    process = ServerProcess(SOCKETCOMM_HOST="127.0.0.1")
    result = run(
        [sys.executable, "client.py", "from the environment"],
        SOCKETCOMM_HOST="127.0.0.1",
        SOCKETCOMM_PORT=str(process.port),
    )
    assert result.stdout == ACK + "\n"
    process.stop()
    bad = run([sys.executable, "client.py"], SOCKETCOMM_PORT="ninety")
    assert bad.returncode != 0
    assert "SOCKETCOMM_PORT" in bad.stderr
    assert "not a port number" in bad.stderr


def read_to_the_end(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (the socket's timeout bounds each read)."""
    received = b""
    while chunk := sock.recv(4096):
        received += chunk
    return received


def test_a_plain_socket_gets_the_original_exchange_then_the_end_of_the_stream() -> None:
    # What `printf 'Hello World' | openssl s_client` or a recv-until-b"" loop needs to finish.
    process = ServerProcess()
    with socket.create_connection((process.host, process.port), timeout=5) as sock:
        sock.sendall(b"Hello World")
        assert read_to_the_end(sock) == ACK.encode()
    # A socketcomm client on the same server stays connected for as long as it likes.
    with socketcomm.Client(process.host, process.port, timeout=5) as client:
        assert client.request("one").decode() == ACK
        assert client.request("two").decode() == ACK
    time.sleep(0.2)
    _, out, _ = process.stop()
    assert out.count("message from client is") == 3, out
    assert out.count("ended!") == 2, out


def test_keep_open_keeps_a_plain_socket_for_an_interactive_session() -> None:
    process = ServerProcess("--keep-open")
    with socket.create_connection((process.host, process.port), timeout=5) as sock:
        for line in (b"first\n", b"second\n"):
            sock.sendall(line)
            assert sock.recv(1024).decode() == ACK
        sock.shutdown(socket.SHUT_WR)
        assert read_to_the_end(sock) == b""
    time.sleep(0.2)
    _, out, _ = process.stop()
    assert "message from client is first" in out
    assert "message from client is second" in out


def test_the_server_survives_what_crashed_the_original() -> None:
    process = ServerProcess()
    address = (process.host, process.port)
    # Invalid UTF-8, a reset, a message over 1024 bytes, and a second client waiting.
    with socket.create_connection(address) as sock:
        sock.sendall(b"caf\xe9")
        sock.settimeout(5)
        assert sock.recv(1024).decode() == ACK
    with socket.create_connection(address) as reset:
        reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    with socket.create_connection(address) as waiting, socket.create_connection(address) as big:
        big.sendall(b"x" * 5000)
        waiting.sendall(b"Hello World")
        waiting.settimeout(5)
        assert waiting.recv(1024).decode() == ACK
    with socketcomm.Client(*address, timeout=5) as client:
        assert client.request("Hello World").decode() == ACK
    time.sleep(0.3)
    code, out, err = process.stop()
    assert code == 0
    assert "message from client is caf\ufffd" in out
    assert "not valid UTF-8" in err
    assert out.count("message from client is Hello World") == 2
    assert out.count("ended!") == 5


@pytest.mark.parametrize("mode", ["echo", "ack"])
def test_native_modes_from_the_command_line(mode: str) -> None:
    process = ServerProcess("--mode", mode, "--reply", "fixed")
    with socketcomm.Client(process.host, process.port, timeout=5) as client:
        assert client.request("question") == (b"question" if mode == "echo" else b"fixed")
    time.sleep(0.2)
    code, out, _ = process.stop()
    assert code == 0
    assert "connected to" in out
    assert "message from client" not in out


def test_sigint_and_sigterm_stop_the_server_with_status_0() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        process = ServerProcess()
        with socketcomm.Client(process.host, process.port, timeout=5) as client:
            assert client.request("hi").decode() == ACK
        started = time.monotonic()
        process.process.send_signal(signum)
        assert process.process.wait(timeout=10) == 0
        assert time.monotonic() - started < 5
        _, _, err = process.stop()
        assert "stopping" in err
        assert "served 1 connections, 1 messages in and 1 out" in err


@pytest.mark.parametrize(
    "blocking_call",
    [
        "server = socketcomm.Server('127.0.0.1', 0)\n    for event in server:\n        pass",
        "server = socketcomm.Server('127.0.0.1', 0, on_message=lambda c, d: d)\n"
        "    server.serve_forever()",
        "server = socketcomm.Server('127.0.0.1', 0, mode='echo')\n    server.serve_forever()",
        "server = socketcomm.Server('127.0.0.1', 0, mode='echo')\n"
        "    socketcomm.Client(*server.address).recv()",
    ],
    ids=["for-event-in-server", "serve-forever-handlers", "serve-forever-native", "client-recv"],
)
def test_ctrl_c_interrupts_a_process_blocked_in_a_call(blocking_call: str) -> None:
    script = (
        "import socketcomm, sys\n"
        "print('ready', flush=True)\n"
        "try:\n"
        f"    {blocking_call}\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', flush=True)\n"
        "    sys.exit(3)\n"
    )
    blocked = Background([sys.executable, "-c", script])
    try:
        blocked.wait_for_line("stdout", "ready")
        time.sleep(0.5)
        started = time.monotonic()
        blocked.process.send_signal(signal.SIGINT)
        assert blocked.process.wait(timeout=5) == 3
        elapsed = time.monotonic() - started
        assert elapsed < 1.0, f"took {elapsed:.2f} s to answer Ctrl-C"
    finally:
        blocked.stop()


def test_a_closed_port_is_a_one_line_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run([sys.executable, "client.py", "--port", str(port)])
    assert result.returncode == 1
    assert result.stderr.startswith("error: [Errno 111] cannot connect")
    assert "Traceback" not in result.stderr


def test_a_port_in_use_is_a_one_line_error() -> None:
    with socketcomm.Server("127.0.0.1", 0) as taken:
        result = run([sys.executable, "server.py", "--port", str(taken.address[1])])
    assert result.returncode == 1
    assert "another program is using that port" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["server.py", "--help"], ["--host", "--port", "--mode", "SOCKETCOMM_PORT", "Ctrl-C"]),
        (["client.py", "--help"], ["--raw", "--timeout", "SOCKETCOMM_HOST", "Hello World"]),
        (["-m", "socketcomm", "--help"], ["server", "client"]),
        (["-m", "socketcomm", "server", "--help"], ["--mode", "echo", "ack"]),
    ],
)
def test_help_explains_itself(command: list[str], expected: list[str]) -> None:
    result = run([sys.executable, *command])
    assert result.returncode == 0
    for word in expected:
        assert word in result.stdout, word


def test_console_script_and_python_m_run_client_and_server() -> None:
    script = shutil.which("socketcomm", path=os.path.dirname(sys.executable)) or shutil.which(
        "socketcomm"
    )
    assert script, "pip install . installs the socketcomm console script"
    server = Background([script, "server", "--port", "0", "--mode", "echo"])
    port = server.wait_for_line("stderr", r"listening on [\d.]+:(\d+)").group(1)
    try:
        result = run([sys.executable, "-m", "socketcomm", "client", "--port", port, "ping"])
        assert result.returncode == 0, result.stderr
        assert result.stdout == "ping\n"
    finally:
        code, _, _ = server.stop()
    assert code == 0


def test_a_chat_room_relays_between_interactive_clients() -> None:
    server = ServerProcess("--mode", "broadcast")
    clients = []
    try:
        for _ in range(3):
            chat = Background(
                [sys.executable, "client.py", "-i", "--port", str(server.port)], stdin=True
            )
            clients.append(chat)
            chat.wait_for_line("stderr", "type messages")
        alice, bob, carol = clients

        alice.send_line("hello from alice")
        bob.wait_for_line("stdout", "^hello from alice$")
        carol.wait_for_line("stdout", "^hello from alice$")
        carol.send_line("/quit")
        assert carol.process.wait(timeout=10) == 0
        bob.send_line("bob here")
        alice.wait_for_line("stdout", "^bob here$")
        # The server stops: the clients still in the room are told, and exit cleanly.
        server.process.send_signal(signal.SIGINT)
        for chat in (alice, bob):
            chat.wait_for_line("stderr", "closed the connection")
            assert chat.process.wait(timeout=10) == 0
        _, out, _ = server.stop()
        assert out.count("connected to") == 3
        assert out.count("ended!") == 3
    finally:
        for chat in clients:
            chat.stop()
        server.stop()


def test_socket_options_from_the_command_line() -> None:
    process = ServerProcess("--keepalive", "30", "--recv-buffer", "262144", "--reuse-port")
    try:
        result = run(
            [sys.executable, "client.py", "--port", str(process.port), "--keepalive", "10"]
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == ACK + "\n"
        # A second server on the same port works because both asked for --reuse-port.
        second = ServerProcess("--reuse-port", "--port", str(process.port))
        second.stop()
        bad = run([sys.executable, "client.py", "--port", str(process.port), "--keepalive", "0"])
        assert bad.returncode == 2
        assert "must be positive" in bad.stderr
    finally:
        process.stop()


def test_workers_share_one_port_and_stop_together() -> None:
    process = ServerProcess("--workers", "2")
    try:
        for _ in range(20):
            result = run([sys.executable, "-c", ORIGINAL_CLIENT, process.host, str(process.port)])
            assert result.stdout == ACK + "\n"
        time.sleep(0.3)
    finally:
        code, out, err = process.stop()
    assert code == 0
    served_by = {line.rsplit(" by ", 1)[1] for line in out.splitlines() if " by worker" in line}
    assert served_by == {"worker 0", "worker 1"}, out
    assert err.count("served ") == 2, "both workers stop and report"


def worker_pids(process: Background, count: int) -> list[int]:
    """The pids of the workers that worker 0 started, once all ``count`` are there."""
    pid = process.process.pid
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/task/{pid}/children") as listing:
            children = [int(child) for child in listing.read().split()]
        if len(children) == count:
            return children
        time.sleep(0.05)
    raise AssertionError(f"worker 0 started {children}, not {count} workers")


def gone(pid: int) -> bool:
    """True once ``pid`` has exited (reaped, or a zombie nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_until_gone(pids: list[int], seconds: float) -> list[int]:
    """The pids still running after ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not all(map(gone, pids)):
        time.sleep(0.05)
    return [pid for pid in pids if not gone(pid)]


def kill_all(pids: list[int]) -> None:
    """Leaves no process behind, whatever the test found."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(sys.platform != "linux", reason="reads the workers' pids from /proc")
def test_sigterm_stops_the_workers_even_when_the_parent_blocked_it() -> None:
    # A benchmark that waits for SIGTERM with sigwait blocks it, and exec keeps the mask.
    launcher = (
        "import os, signal, sys\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})\n"
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n"
    )
    args = ["server.py", "--port", "0", "--workers", "3"]
    process = Background([sys.executable, "-c", launcher, *args])
    # Every worker has its SIGTERM handler once it says it listens (before, SIGTERM just ends
    # a process that is still starting, which is not what this test is about).
    for _ in range(3):
        process.wait_for_line("stderr", "listening on")
    workers = worker_pids(process, 2)
    try:
        process.process.send_signal(signal.SIGTERM)
        # Waited for before stop(), whose own SIGTERM would cut the graceful stop short (a
        # second signal during the shutdown stops at once, as a second Ctrl-C does).
        process.process.wait(timeout=15)
        code, _, err = process.stop(timeout=15)
        assert code == 0, err
        assert err.count("served ") == 3, err
        assert wait_until_gone(workers, 5) == []
    finally:
        kill_all(workers)


@pytest.mark.skipif(sys.platform != "linux", reason="reads the workers' pids from /proc")
def test_workers_stop_when_worker_0_is_killed() -> None:
    process = ServerProcess("--workers", "3")
    workers = worker_pids(process, 2)
    try:
        process.process.kill()  # SIGKILL: worker 0 cannot tell anyone
        process.process.wait(timeout=10)
        assert wait_until_gone(workers, 5) == [], "the workers outlived worker 0"
    finally:
        kill_all(workers)
        process.stop()


def test_every_socket_option_has_a_flag() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        local_port = probe.getsockname()[1]
    process = ServerProcess(
        "--backlog", "16", "--no-reuse-addr", "--linger", "1", "--ping-interval", "0.5"
    )
    try:
        result = run(
            [
                sys.executable,
                "client.py",
                "--port",
                str(process.port),
                "--local-address",
                f"127.0.0.1:{local_port}",
                "--keepalive",
                "5",
                "--keepalive-interval",
                "2",
                "--keepalive-count",
                "3",
                "--linger",
                "0",
                # 0 turns the client's pings off (None in the library).
                "--ping-interval",
                "0",
                "--ping-timeout",
                "5",
            ]
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == ACK + "\n"
        process.wait_for_line("stdout", f"connected to \\('127.0.0.1', {local_port}\\)")
    finally:
        process.stop()


class _Built(Exception):
    """Raised by a stand-in for `Server` once it has seen its keywords."""


def _server_keywords(monkeypatch: pytest.MonkeyPatch, *flags: str) -> dict[str, object]:
    """The keywords the command line builds its `Server` with, for these flags."""
    from socketcomm import cli

    seen: dict[str, object] = {}

    def build(*args: object, **keywords: object) -> None:
        seen.update(keywords)
        raise _Built

    monkeypatch.setattr(cli, "Server", build)
    with pytest.raises(_Built):
        cli.main(["server", "--port", "0", *flags])
    return seen


def test_the_byte_budgets_reach_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _server_keywords(
        monkeypatch,
        "--inbound-bytes",
        "65536",
        "--outbound-bytes",
        "131072",
        "--max-buffered",
        "67108864",
    )
    assert (seen["inbound_bytes"], seen["outbound_bytes"], seen["max_buffered"]) == (
        65536,
        131072,
        67108864,
    )
    defaults = _server_keywords(monkeypatch)
    assert defaults["inbound_bytes"] == socketcomm._socketcomm.DEFAULT_INBOUND_BYTES
    assert defaults["max_buffered"] is None, "one process: the server's own default"


def test_workers_share_the_default_memory_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _server_keywords(monkeypatch, "--workers", "4")
    assert seen["max_buffered"] == socketcomm._socketcomm.default_max_buffered() // 4


def test_print_config_shows_the_byte_budgets() -> None:
    command = ["-m", "socketcomm", "server", "--inbound-bytes", "65536", "--print-config"]
    shown = run([sys.executable, *command])
    assert "inbound_bytes = 65536  # flag" in shown.stdout, shown.stdout
    assert "# max_buffered is not set  # default" in shown.stdout, shown.stdout


def test_workers_in_broadcast_mode_keep_one_room() -> None:
    """`--workers 2 --mode broadcast` is two listeners in one process: every other client gets
    every message, whichever listener took it (processes would each keep a room of their
    own: 3 of 7 clients received it)."""
    server = ServerProcess("--workers", "2", "--mode", "broadcast")
    clients = []
    try:
        server.wait_for_line("stderr", "2 listeners in one process")
        clients = [socketcomm.Client("127.0.0.1", server.port, timeout=5) for _ in range(8)]
        for client in clients:  # every client's hello is through: each is in the room
            client.send(b"")
        for client in clients:
            with contextlib.suppress(TimeoutError):
                while True:
                    client.recv(timeout=0.3)
        clients[0].send(b"to everyone")
        for client in clients[1:]:
            assert client.recv(timeout=5) == b"to everyone"
        with pytest.raises(TimeoutError):
            clients[0].recv(timeout=0.2)
    finally:
        for client in clients:
            client.close()
        code, _, err = server.stop()
    assert code == 0
    assert err.count("served ") == 1, "one process"


def test_chat_rooms_on_the_command_line() -> None:
    """`client.py -i --room ROOM` against `server.py --mode broadcast`: lines go to the room,
    /join, /leave and /rooms change and show the rooms, and a room's message shows its name."""
    server = ServerProcess("--mode", "broadcast")
    clients = []
    try:
        for room in ("lobby", "lobby", "kitchen"):
            chat = Background(
                [sys.executable, "client.py", "-i", "--port", str(server.port), "--room", room],
                stdin=True,
            )
            clients.append(chat)
            chat.wait_for_line("stderr", f"joined {room}")
            chat.wait_for_line("stderr", "type messages")
        alice, bob, carol = clients

        alice.send_line("hi lobby")
        bob.wait_for_line("stdout", r"^\[lobby\] hi lobby$")
        carol.send_line("/join lobby")
        carol.wait_for_line("stderr", "joined lobby; lines go to it")
        carol.send_line("/rooms")
        carol.wait_for_line("stderr", r"rooms: kitchen, lobby \(current\)")
        alice.send_line("second")
        carol.wait_for_line("stdout", r"^\[lobby\] second$")
        bob.wait_for_line("stdout", r"^\[lobby\] second$")
        carol.send_line("/leave lobby")
        carol.wait_for_line("stderr", "left lobby; lines go to kitchen")
        carol.send_line("to the kitchen")
        bob.send_line("/leave nowhere")
        bob.wait_for_line("stderr", "left nowhere")
        bob.send_line("/join a b")
        bob.wait_for_line("stderr", "error: invalid room or topic")
        alice.send_line("third")
        bob.wait_for_line("stdout", r"^\[lobby\] third$")
        for chat in clients:
            chat.send_line("/quit")
            assert chat.process.wait(timeout=10) == 0
        outputs = [chat.process.stdout.read() if chat.process.stdout else "" for chat in clients]
        assert "kitchen" not in "".join(outputs[:2]), "nobody else is in the kitchen"
        assert "third" not in outputs[2], "carol left the lobby"
    finally:
        for chat in clients:
            chat.stop()
        server.stop()
