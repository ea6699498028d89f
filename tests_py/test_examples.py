"""The examples run against real servers, as a user would run them."""

from __future__ import annotations

import sys
import threading

import socketcomm

from conftest import ROOT, Background, run


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


def run_example(name: str) -> str:
    result = run([sys.executable, str(ROOT / "examples" / name)])
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_native_modes_example() -> None:
    assert run_example("native_modes.py").splitlines() == [
        "echo: hello",
        "ack: received",
        "broadcast: hi bob",
    ]


def test_handlers_example_keeps_serving_after_a_failing_handler() -> None:
    result = run([sys.executable, str(ROOT / "examples" / "handlers.py")])
    assert result.returncode == 0, result.stderr
    assert "HELLO\nSTILL SERVING\n" in result.stdout
    assert "on_message handler raised; the server keeps serving" in result.stderr
    assert "ValueError: this handler does not like 'fail'" in result.stderr


def test_pull_loop_example() -> None:
    out = run_example("pull_loop.py")
    for n in range(3):
        assert f"client got: answer to question {n}" in out
    assert "disconnected: closed by the client" in out


def test_chat_room_example() -> None:
    assert run_example("chat_room.py").splitlines() == [
        "bo hears 'ann: hello, room'",
        "cy hears 'ann: hello, room'",
    ]


def test_asyncio_example() -> None:
    assert run_example("asyncio_echo.py").splitlines() == [
        "echo: hello 0",
        "echo: hello 1",
        "echo: hello 2",
    ]


def test_file_transfer_example() -> None:
    result = run([sys.executable, str(ROOT / "examples" / "file_transfer.py")])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("uploaded example.bin: 4194304 bytes, blake3 ")
    assert lines[1] == "the server saved example.bin (4194304 bytes)"
    digest = lines[0].rsplit(" ", 1)[1]
    assert lines[2] == f"downloaded copy-example.bin, blake3 {digest}"
    assert "100%" in result.stderr  # the progress bar


def test_tls_example() -> None:
    assert run_example("tls_echo.py").splitlines() == [
        "self-signed: hello",
        "CA-signed: hello",
        "mutual: 'hello from alice' from CN=alice ['alice@example.org']",
    ]


def test_the_stdlib_client_subscribes_to_a_topic() -> None:
    with socketcomm.Server("127.0.0.1", 0, event_queue=1000) as server:
        subscriber = Background(
            [
                sys.executable,
                str(ROOT / "examples" / "plain_socket_client.py"),
                "--port",
                str(server.address[1]),
                "--subscribe",
                "news.>",
                "--count",
                "2",
            ]
        )
        try:
            subscriber.wait_for_line("stdout", "^subscribed to news.>$")
            assert server.publish("news.world", "first") == 1
            assert server.publish("sport", "not for it") == 0
            assert server.publish("news.eu.fr", b"second") == 1
            assert subscriber.process.wait(timeout=10) == 0
            assert subscriber.process.stdout is not None
            assert subscriber.process.stdout.read() == "news.world: first\nnews.eu.fr: second\n"
        finally:
            subscriber.stop()
