"""The pytest plugin's fixtures, used as a user would use them."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import socketcomm
import socketcomm.aio
from socketcomm.testing import ServerFactory


def test_the_default_server_echoes(socketcomm_client: socketcomm.Client) -> None:
    assert socketcomm_client.request("ping") == b"ping"


class TestAUsersHandler:
    @pytest.fixture
    def socketcomm_server_options(self) -> dict[str, Any]:
        return {"on_message": lambda conn_id, data: data.upper()}

    def test_sync(self, socketcomm_client: socketcomm.Client) -> None:
        assert socketcomm_client.request("hi") == b"HI"

    def test_async(self, socketcomm_aio_client: socketcomm.aio.Client) -> None:
        async def main() -> bytes:
            async with socketcomm_aio_client as client:
                return await client.request("hi")

        assert asyncio.run(main()) == b"HI"


def test_the_factory_makes_and_closes_servers(
    socketcomm_server_factory: ServerFactory,
) -> None:
    ack = socketcomm_server_factory(mode="ack", reply="yes")
    with socketcomm.Client(*ack.address, timeout=5) as client:
        assert client.request("?") == b"yes"
