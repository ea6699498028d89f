"""The asyncio API: socketcomm.aio has the same names as the blocking API, awaitable.

python examples/asyncio_echo.py          # on uvloop too: it works on either loop
"""

from __future__ import annotations

import asyncio

import socketcomm.aio


async def main() -> None:
    async with socketcomm.aio.Server("127.0.0.1", 0) as server:

        async def serve() -> None:
            async for event in server:
                if isinstance(event, socketcomm.aio.Message):
                    await event.reply(b"echo: " + event.data)

        serving = asyncio.create_task(serve())
        async with socketcomm.aio.Client(*server.address, timeout=5) as client:
            # Many tasks may share one client; each request gets its own reply.
            replies = await asyncio.gather(*(client.request(f"hello {n}") for n in range(3)))
            for reply in replies:
                print(reply.decode())
        await server.close()
        await serving


if __name__ == "__main__":
    asyncio.run(main())
