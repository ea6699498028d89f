"""The examples run against real servers, as a user would run them."""

from __future__ import annotations

import sys
import threading

import socketcomm

from conftest import ROOT, run


def test_the_stdlib_client_speaks_the_framed_protocol() -> None:
    with socketcomm.Server("127.0.0.1", 0) as server:
        result_holder: list[str] = []

        def serve() -> None:
            for event in server:
                if isinstance(event, socketcomm.Message):
                    assert event.request_id == 1
                    event.reply(b"framed: " + event.data)
                elif isinstance(event, socketcomm.Disconnected):
                    result_holder.append(event.reason)
                    return

        serving = threading.Thread(target=serve)
        serving.start()
        result = run(
            [
                sys.executable,
                str(ROOT / "examples" / "plain_socket_client.py"),
                "--port",
                str(server.address[1]),
                "stdlib only",
            ]
        )
        serving.join(timeout=10)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "framed: stdlib only\n"
    assert result_holder == ["closed by the client: done"]


def test_the_stdlib_client_against_a_native_echo_server() -> None:
    with socketcomm.Server("127.0.0.1", 0, mode="echo") as server:
        result = run(
            [
                sys.executable,
                str(ROOT / "examples" / "plain_socket_client.py"),
                "--port",
                str(server.address[1]),
            ]
        )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Hello World\n"
