"""The fan-out benchmark's redis-py row: the same publisher and subscribers as the compiled
load generator's (benches/loadgen/src/bin/fanout.rs), written as a redis-py user would, on
asyncio with uvloop, one process: `python benches/fanout_redis_py.py PORT SUBSCRIBERS SIZE
MESSAGES`. Prints the same JSON object."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from typing import Any

import redis.asyncio as redis
import uvloop

TOPIC = "bench"
WINDOW = 64


def cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


async def main(port: int, subscribers: int, size: int, messages: int) -> dict[str, Any]:
    url = f"redis://127.0.0.1:{port}/0"
    clients = [redis.from_url(url) for _ in range(subscribers + 1)]
    received = [0] * subscribers
    latencies: list[int] = []

    async def subscriber(index: int) -> None:
        pubsub = clients[index].pubsub()
        await pubsub.subscribe(TOPIC)
        ready.release()
        while received[index] < messages:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is None:
                continue
            sent = int.from_bytes(message["data"][:8], "big")
            latencies.append(time.monotonic_ns() - sent)
            received[index] += 1
        await pubsub.aclose()

    ready = asyncio.Semaphore(0)
    tasks = [asyncio.create_task(subscriber(i)) for i in range(subscribers)]
    for _ in range(subscribers):
        await ready.acquire()
    await asyncio.sleep(0.2)
    publisher = clients[-1]
    cpu_before, started = cpu_seconds(), time.monotonic()
    sent = 0
    while sent < messages:
        while sent >= min(received) + WINDOW:
            await asyncio.sleep(0)
        batch = min(16, messages - sent)
        async with publisher.pipeline(transaction=False) as pipe:
            for _ in range(batch):
                body = time.monotonic_ns().to_bytes(8, "big") + b"a" * (size - 8)
                pipe.publish(TOPIC, body)
            await pipe.execute()
        sent += batch
    await asyncio.wait_for(asyncio.gather(*tasks), 120)
    seconds = time.monotonic() - started
    cpu = cpu_seconds() - cpu_before
    for client in clients:
        await client.aclose()
    latencies.sort()
    return {
        "messages": messages,
        "subscribers": subscribers,
        "seconds": round(seconds, 3),
        "deliveries_per_s": messages * subscribers / seconds,
        "published_per_s": messages / seconds,
        "p50_us": latencies[len(latencies) // 2] / 1000,
        "p99_us": latencies[int(len(latencies) * 0.99)] / 1000,
        "loadgen_cpu_s": round(cpu, 3),
        "server_cpu_s": None,
        "mean_us": statistics.fmean(latencies) / 1000,
    }


if __name__ == "__main__":
    port, subscribers, size, messages = (int(a) for a in sys.argv[1:5])
    print(json.dumps(uvloop.run(main(port, subscribers, size, messages))))
