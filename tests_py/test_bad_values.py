"""Bad values from Python get a ValueError (or TypeError) naming the option, at construction or
at the call, never a panic (`PanicException` is a `BaseException` that `except Exception` does
not catch) and never a failure later, per connection."""

from __future__ import annotations

import asyncio
import inspect
import math
from collections.abc import Callable
from typing import Any

import pytest

import socketcomm
import socketcomm.aio as aio

# Durations beyond a year, and every value that is no duration at all.
BAD_SECONDS = [-1.0, math.nan, math.inf, 1e19, 1e300]


def server_with(**options: Any) -> None:
    socketcomm.Server("127.0.0.1", **{"port": 0, **options}).close()


def expect_value_error(option: str, make: Callable[[], object]) -> None:
    with pytest.raises(ValueError) as raised:
        make()
    assert option in str(raised.value), str(raised.value)


@pytest.mark.parametrize("seconds", BAD_SECONDS)
@pytest.mark.parametrize(
    "option",
    [
        "idle_timeout",
        "slow_handler",
        "tls_handshake_timeout",
        "keepalive",
        "linger",
        "ping_interval",
        "ping_timeout",
    ],
)
def test_server_durations(option: str, seconds: float) -> None:
    expect_value_error(option, lambda: server_with(**{option: seconds}))


@pytest.mark.parametrize("seconds", BAD_SECONDS)
@pytest.mark.parametrize(
    "option",
    [
        "timeout",
        "connect_timeout",
        "backoff",
        "keepalive",
        "linger",
        "ping_interval",
        "ping_timeout",
    ],
)
def test_client_durations(echo_server: socketcomm.Server, option: str, seconds: float) -> None:
    options: dict[str, Any] = {option: seconds}

    def connect() -> None:
        socketcomm.Client(*echo_server.address, **options).close()

    expect_value_error(option, connect)


@pytest.mark.parametrize("seconds", BAD_SECONDS)
def test_call_timeouts(echo_server: socketcomm.Server, seconds: float, tmp_path: Any) -> None:
    path = tmp_path / "f.txt"
    path.write_text("x")
    with socketcomm.Client(*echo_server.address) as client:
        expect_value_error("timeout", lambda: client.recv(timeout=seconds))
        expect_value_error("timeout", lambda: client.request(b"x", timeout=seconds))
        expect_value_error("timeout", lambda: client.send_file(path, timeout=seconds))
    server = socketcomm.Server("127.0.0.1", 0)
    try:
        expect_value_error("timeout", lambda: server.recv(timeout=seconds))
        expect_value_error("timeout", lambda: server.recv_many(timeout=seconds))
    finally:
        expect_value_error("timeout", lambda: server.close(timeout=seconds))
        server.close()


@pytest.mark.parametrize(
    ("option", "value"),
    [
        *((option, value) for option in ("event_queue", "outbound_queue") for value in (0, 2**21)),
        ("max_connections", 0),
        ("max_connections", 10_000_001),
        *((option, 2**61) for option in ("event_queue", "outbound_queue", "max_connections")),
        ("outbound_bytes", 0),
        ("outbound_bytes", 2**32),
        ("inbound_bytes", 0),
        ("inbound_bytes", 2**32),
        ("max_buffered", 0),
        ("max_buffered", 2**51),
    ],
)
def test_server_counts(option: str, value: int) -> None:
    expect_value_error(option, lambda: server_with(**{option: value}))


@pytest.mark.parametrize("option", ["on_message", "on_connect", "on_disconnect", "on_file"])
def test_a_handler_that_cannot_be_called_is_refused_at_construction(option: str) -> None:
    with pytest.raises(TypeError, match=f"invalid {option}: it must be callable.*not int"):
        server_with(**{option: 5})


def test_huge_values_that_used_to_break_every_connection_are_refused() -> None:
    # Accepted at construction before, then every connection's task panicked.
    expect_value_error("idle_timeout", lambda: server_with(idle_timeout=1e19))
    expect_value_error("outbound_queue", lambda: server_with(outbound_queue=2**61))


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("port", -1),
        ("port", 65536),
        ("max_frame", -5),
        ("max_frame", 2**32),
        ("max_frame", 10**30),
        ("backlog", -1),
        ("backlog", 2**32),
        ("max_connections", -1),
        ("recv_buffer", -1),
        ("send_buffer", -1),
        ("keepalive_count", -1),
        ("max_file_size", -1),
        ("workers", -1),
        ("event_queue", -1),
        ("outbound_queue", -1),
        ("handler_threads", -1),
        ("inbound_bytes", -1),
        ("max_buffered", -1),
    ],
)
def test_server_integers_out_of_range(option: str, value: int) -> None:
    with pytest.raises(ValueError, match=f"invalid {option}: .* is not an integer from"):
        server_with(**{option: value})


@pytest.mark.parametrize("option", ["port", "max_frame", "backlog", "recv_buffer", "workers"])
@pytest.mark.parametrize("value", ["80", 1.5, True])
def test_server_integers_of_the_wrong_type(option: str, value: object) -> None:
    with pytest.raises(TypeError, match=f"invalid {option}: expected an integer, not"):
        server_with(**{option: value})


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("max_frame", -1),
        ("retries", -1),
        ("max_file_size", -1),
        ("recv_buffer", -1),
        ("inbound_bytes", -1),
        ("inbound_bytes", 0),
    ],
)
def test_client_integers_out_of_range(
    echo_server: socketcomm.Server, option: str, value: int
) -> None:
    options: dict[str, Any] = {option: value}
    with pytest.raises(ValueError, match=f"invalid {option}: "):
        socketcomm.Client(*echo_server.address, **options)
    with pytest.raises(ValueError, match="invalid port: "):
        socketcomm.Client(echo_server.address[0], -1)


def test_connection_ids_out_of_range(echo_server: socketcomm.Server) -> None:
    with pytest.raises(ValueError, match="invalid conn_id: -1"):
        echo_server.send(-1, b"x")
    with pytest.raises(ValueError, match="invalid conn_id: -1"):
        echo_server.disconnect(-1)


def test_broadcast_exclusions_out_of_range(echo_server: socketcomm.Server) -> None:
    with pytest.raises(ValueError, match="invalid exclude: -1"):
        echo_server.broadcast(b"x", exclude=[-1])
    with pytest.raises(ValueError, match="invalid exclude: -1"):
        echo_server.broadcast(b"x", exclude=-1)


# Every keyword option of every constructor, and every option of the methods, gets each of
# these; what is not refused with a ValueError or TypeError naming the option fails.
SWEEP = [-1, 0.5, math.nan, math.inf, 10**30, "x", object()]
# Options for which some of the values above mean something (a reply of "x", half a second).
MEANINGFUL: dict[str, set[str]] = {
    "reply": {"'x'"},
    **{
        option: {"0.5"}
        for option in (
            "slow_handler",
            "tls_handshake_timeout",
            "hello_timeout",
            "partial_ttl",
            "idle_timeout",
            "keepalive",
            "keepalive_interval",
            "linger",
            "timeout",
            "connect_timeout",
            "backoff",
            "ping_interval",
            "ping_timeout",
        )
    },
}
# Folders: a name that does not exist is an OSError naming the option, as a user expects.
FOLDERS = {"upload_dir", "download_dir"}


def names(error: BaseException, option: str) -> bool:
    """Whether the error's message, or a note PyO3 adds to it, names the option."""
    return option in str(error) or any(option in note for note in getattr(error, "__notes__", []))


def refused(option: str, make: Callable[[Any], object]) -> list[str]:
    """The values of SWEEP that ``make`` does not refuse properly, with what happened."""
    wrong = []
    for value in SWEEP:
        if repr(value) in MEANINGFUL.get(option, set()):
            continue
        try:
            made = make(value)
        except (ValueError, TypeError) as error:
            if not names(error, option):
                wrong.append(f"{value!r}: {type(error).__name__} without the name: {error}")
            continue
        except OSError as error:
            if option not in FOLDERS or not names(error, option):
                wrong.append(f"{value!r}: {type(error).__name__}: {error}")
            continue
        except BaseException as error:
            wrong.append(f"{value!r}: {type(error).__name__}: {error}")
            continue
        close = getattr(made, "close", None)
        if callable(close):
            close()
        wrong.append(f"{value!r}: accepted")
    return wrong


def keyword_options(callable_: Callable[..., object]) -> list[str]:
    return [
        p.name
        for p in inspect.signature(callable_).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]


@pytest.mark.parametrize("option", keyword_options(socketcomm.Server))
def test_every_server_option(option: str) -> None:
    assert refused(option, lambda value: server_with(**{option: value})) == []


@pytest.mark.parametrize("option", keyword_options(socketcomm.Client))
def test_every_client_option(echo_server: socketcomm.Server, option: str) -> None:
    def connect(value: Any) -> socketcomm.Client:
        return socketcomm.Client(*echo_server.address, **{option: value})

    assert refused(option, connect) == []


@pytest.mark.parametrize("option", keyword_options(socketcomm.Client))
def test_every_asyncio_client_option(echo_server: socketcomm.Server, option: str) -> None:
    def connect(value: Any) -> None:
        async def main() -> None:
            async with aio.Client(*echo_server.address, **{option: value}):
                pass

        asyncio.run(main())

    assert refused(option, connect) == []


@pytest.mark.parametrize("option", ["max_frame", "idle_timeout", "ping_interval", "port"])
def test_asyncio_server_options(option: str) -> None:
    def serve(value: Any) -> None:
        async def main() -> None:
            async with aio.Server("127.0.0.1", **{"port": 0, option: value}):
                pass

        asyncio.run(main())

    assert refused(option, serve) == []


def test_every_option_of_the_methods(echo_server: socketcomm.Server, tmp_path: Any) -> None:
    path = tmp_path / "f.txt"
    path.write_text("x")
    server = socketcomm.Server("127.0.0.1", 0)
    wrong: dict[str, list[str]] = {}
    try:
        with socketcomm.Client(*echo_server.address) as client:
            calls: dict[str, Callable[[Any], object]] = {
                "Server.recv timeout": lambda v: server.recv(timeout=v),
                "Server.recv_many max": lambda v: server.recv_many(max=v, timeout=0.01),
                "Server.recv_many timeout": lambda v: server.recv_many(timeout=v),
                "Server.send conn_id": lambda v: server.send(v, b"x"),
                "Server.disconnect conn_id": lambda v: server.disconnect(v),
                "Server.latency conn_id": lambda v: server.latency(v),
                "Server.broadcast exclude": lambda v: server.broadcast(b"x", exclude=v),
                "Server.publish exclude": lambda v: server.publish("r", b"x", exclude=v),
                "Server.join conn_id": lambda v: server.join(v, "r"),
                "Server.leave conn_id": lambda v: server.leave(v, "r"),
                "Server.rooms conn_id": lambda v: server.rooms(v),
                "Server.send_file conn_id": lambda v: server.send_file(v, path),
                "Client.recv timeout": lambda v: client.recv(timeout=v),
                "Client.request timeout": lambda v: client.request(b"x", timeout=v),
                "Client.send_file timeout": lambda v: client.send_file(path, timeout=v),
            }
            for call, make in calls.items():
                option = call.rsplit(" ", 1)[1]
                found = refused(option, make)
                if found:
                    wrong[call] = found
    finally:
        server.close()
    assert wrong == {}
