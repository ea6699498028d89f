"""JSON messages on both clients and the server: round trips with the standard library's json
and with a custom dumps/loads, and a message that is not JSON."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import socketcomm
import socketcomm.aio as aio

DOCUMENT = {"name": "ada", "scores": [1, 2.5, None, True], "nested": {"é": "ü"}}


@pytest.fixture
def server() -> Iterator[socketcomm.Server]:
    def answer(conn_id: int, data: bytes) -> bytes:
        """A JSON object comes back wrapped in {"got": ...}; anything else as it is."""
        if data.startswith(b"{"):
            return json.dumps({"got": json.loads(data)}).encode()
        return data

    with socketcomm.Server("127.0.0.1", 0, on_message=answer) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        yield server


def test_json_round_trips_with_the_standard_library(server: socketcomm.Server) -> None:
    with socketcomm.Client(*server.address, timeout=5) as client:
        assert client.request_json(DOCUMENT) == {"got": DOCUMENT}
        client.send_json(DOCUMENT)
        assert client.recv_json() == {"got": DOCUMENT}
        client.send(b"[1, 2")
        with pytest.raises(ValueError, match="not JSON") as raised:
            client.recv_json()
        assert isinstance(raised.value.__cause__, json.JSONDecodeError)
        with pytest.raises(TypeError):
            client.send_json({"a set": {1, 2}})
        assert client.request(b"still fine") == b"still fine"


def test_a_custom_dumps_and_loads(server: socketcomm.Server) -> None:
    calls: list[str] = []

    def dumps(obj: Any) -> bytes:
        calls.append("dumps")
        return json.dumps(obj, sort_keys=True).encode()  # bytes, as orjson gives

    def loads(data: bytes) -> Any:
        calls.append("loads")
        return json.loads(data)

    with socketcomm.Client(*server.address, timeout=5) as client:
        assert client.request_json({"b": 1, "a": 2}, dumps=dumps, loads=loads) == {
            "got": {"a": 2, "b": 1}
        }
        assert calls == ["dumps", "loads"]


def test_the_server_side_of_json() -> None:
    with socketcomm.Server("127.0.0.1", 0) as server:
        with socketcomm.Client(*server.address, timeout=5) as client:
            client.send_json(DOCUMENT)
            client.subscribe("feed")
            message = next(e for e in server if isinstance(e, socketcomm.Message))
            assert message.json() == DOCUMENT
            assert message.json(loads=lambda data: json.loads(data)["name"]) == "ada"
            message.reply_json({"ok": True})
            assert client.recv_json() == {"ok": True}
            server.send_json(message.conn_id, [1, 2, 3])
            assert client.recv_json() == [1, 2, 3]
            assert server.broadcast_json({"all": 1}) == 1
            assert client.recv_json() == {"all": 1}
            assert server.publish_json("feed", {"price": 1.08}) == 1
            received = client.recv_message()
            assert (received.topic, received.json()) == ("feed", {"price": 1.08})
            client.publish_json("feed", {"from": "client"})
            published = next(e for e in server if isinstance(e, socketcomm.Message))
            assert (published.topic, published.json()) == ("feed", {"from": "client"})
            client.send(b"not json")
            plain = next(e for e in server if isinstance(e, socketcomm.Message))
            with pytest.raises(ValueError, match="not JSON"):
                plain.json()


def test_json_from_asyncio(server: socketcomm.Server) -> None:
    async def main() -> None:
        async with aio.Client(*server.address, timeout=5) as client:
            assert await client.request_json(DOCUMENT) == {"got": DOCUMENT}
            await client.send_json([1, "two"])
            assert await client.recv_json() == [1, "two"], "not an object: echoed as it is"
            await client.send(b"[broken")
            with pytest.raises(ValueError, match="not JSON"):
                await client.recv_json()

        async with aio.Server("127.0.0.1", 0) as hub:
            async with aio.Client(*hub.address, timeout=5) as client:
                await client.send_json({"n": 1})
                event = await hub.recv(timeout=5)
                while not isinstance(event, aio.Message):
                    event = await hub.recv(timeout=5)
                assert event.json() == {"n": 1}
                await event.reply_json({"n": 2})
                assert await client.recv_json() == {"n": 2}
                await hub.send_json(event.conn_id, "text")
                assert await client.recv_json() == "text"
                assert await hub.broadcast_json(None) == 1
                assert await client.recv_json() is None
                assert await client.subscribe("feed")
                assert await hub.publish_json("feed", {"p": 1}) == 1
                received = await client.recv_message()
                assert (received.topic, received.json()) == ("feed", {"p": 1})

    asyncio.run(main())
