"""Client-side rows of the benchmark, each run as `python benches/clients.py KIND PORT` against
the minimal tokio peer (so the server is never the limit); prints one JSON object.

  request-socketcomm   Client.request round trips, 100-byte payload
  request-stdlib       the same framing by hand on a blocking stdlib socket
  send-socketcomm      Client.send in a loop, 100-byte payload (the peer discards)
  send-stdlib          struct.pack + sendall in a loop
  request-aio          socketcomm.aio Client.request round trips on uvloop
  request-streams      the same framing by hand with asyncio streams on uvloop
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time

HELLO = b"\x89SCM\x01\x01\x00\x00" + struct.pack(">I", 16 << 20)
PAYLOAD = b"x" * 100
ROUND_TRIPS = 20_000
SENDS = 300_000


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return bytes(data)


def stdlib_connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(HELLO)
    recv_exactly(sock, 12)
    return sock


def summary(samples: list[int], elapsed: float) -> dict[str, float]:
    """Rate and latency percentiles of round trips timed in nanoseconds."""
    samples.sort()
    return {
        "messages": len(samples),
        "msgs_per_s": len(samples) / elapsed,
        "p50_us": samples[len(samples) // 2] / 1000,
        "p99_us": samples[int(len(samples) * 0.99)] / 1000,
    }


def latencies(one_round_trip: object, count: int) -> dict[str, float]:
    assert callable(one_round_trip)
    for _ in range(1000):  # warm up
        one_round_trip()
    samples = []
    started = time.perf_counter()
    for _ in range(count):
        t0 = time.perf_counter_ns()
        one_round_trip()
        samples.append(time.perf_counter_ns() - t0)
    return summary(samples, time.perf_counter() - started)


def request_socketcomm(port: int) -> dict[str, float]:
    import socketcomm

    with socketcomm.Client("127.0.0.1", port, timeout=10) as client:
        return latencies(lambda: client.request(PAYLOAD), ROUND_TRIPS)


def request_stdlib(port: int) -> dict[str, float]:
    sock = stdlib_connect(port)
    request_id = 0

    def round_trip() -> bytes:
        nonlocal request_id
        request_id += 1
        sock.sendall(struct.pack(">IBI", 5 + len(PAYLOAD), 2, request_id) + PAYLOAD)
        length = struct.unpack(">I", recv_exactly(sock, 4))[0]
        reply = recv_exactly(sock, length)
        assert reply[0] == 3 and int.from_bytes(reply[1:5], "big") == request_id
        return reply[5:]

    with sock:
        return latencies(round_trip, ROUND_TRIPS)


def send_rate(send_all: object) -> dict[str, float]:
    assert callable(send_all)
    started = time.perf_counter()
    send_all()
    elapsed = time.perf_counter() - started
    return {"messages": SENDS, "msgs_per_s": SENDS / elapsed}


def send_socketcomm(port: int) -> dict[str, float]:
    import socketcomm

    client = socketcomm.Client("127.0.0.1", port, timeout=10)

    def send_all() -> None:
        for _ in range(SENDS):
            client.send(PAYLOAD)
        client.close()  # flushes: the time includes every byte written

    return send_rate(send_all)


def send_stdlib(port: int) -> dict[str, float]:
    sock = stdlib_connect(port)
    header = struct.pack(">IB", 1 + len(PAYLOAD), 1)

    def send_all() -> None:
        for _ in range(SENDS):
            sock.sendall(header + PAYLOAD)
        sock.close()

    return send_rate(send_all)


async def async_latencies(one_round_trip: object, count: int) -> dict[str, float]:
    assert callable(one_round_trip)
    for _ in range(1000):  # warm up
        await one_round_trip()
    samples = []
    started = time.perf_counter()
    for _ in range(count):
        t0 = time.perf_counter_ns()
        await one_round_trip()
        samples.append(time.perf_counter_ns() - t0)
    return summary(samples, time.perf_counter() - started)


def request_aio(port: int) -> dict[str, float]:
    import uvloop

    import socketcomm.aio

    async def main() -> dict[str, float]:
        async with socketcomm.aio.Client("127.0.0.1", port, timeout=10) as client:
            return await async_latencies(lambda: client.request(PAYLOAD), ROUND_TRIPS)

    result: dict[str, float] = uvloop.run(main())
    return result


def request_streams(port: int) -> dict[str, float]:
    import asyncio

    import uvloop

    async def main() -> dict[str, float]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer.write(HELLO)
        await reader.readexactly(12)
        request_id = 0

        async def round_trip() -> bytes:
            nonlocal request_id
            request_id += 1
            writer.write(struct.pack(">IBI", 5 + len(PAYLOAD), 2, request_id) + PAYLOAD)
            await writer.drain()
            length = struct.unpack(">I", await reader.readexactly(4))[0]
            reply = await reader.readexactly(length)
            assert reply[0] == 3 and int.from_bytes(reply[1:5], "big") == request_id
            return reply[5:]

        try:
            return await async_latencies(round_trip, ROUND_TRIPS)
        finally:
            writer.close()

    result: dict[str, float] = uvloop.run(main())
    return result


KINDS = {
    "request-socketcomm": request_socketcomm,
    "request-stdlib": request_stdlib,
    "send-socketcomm": send_socketcomm,
    "send-stdlib": send_stdlib,
    "request-aio": request_aio,
    "request-streams": request_streams,
}

if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in KINDS:
        print(__doc__)
        raise SystemExit(2)
    print(json.dumps(KINDS[sys.argv[1]](int(sys.argv[2]))))
