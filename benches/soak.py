"""The long soaks of docs/reliability.md, each bounded in count and time, with their figures:

    python benches/soak.py messages   # 1,000 clients x 1,000 messages, checksummed, in order
    python benches/soak.py idle       # 10,000 idle connections, framed and raw: server RSS
                                      # per connection, next to uvloop servers holding the same
    python benches/soak.py churn      # 20,000 connect/close cycles: descriptors and RSS
    python benches/soak.py all        # the three, one after the other

Servers run in their own process, so that their descriptors and memory are theirs alone.
Traffic stays on 127.0.0.1. Each prints one JSON line with what it measured and exits non-zero
when something was lost, corrupted, reordered or leaked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import struct
import subprocess
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TypedDict

from socketcomm._lifetime import python_command

BENCHES = Path(__file__).resolve().parent
HELLO = b"\x89SCM\x01\x01\x00\x00" + struct.pack(">I", 16 << 20)

# Serves the `Echo` protocol defined before it on uvloop, and prints the port.
UVLOOP_SERVE = """
async def main():
    server = await asyncio.get_running_loop().create_server(Echo, "127.0.0.1", 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()
uvloop.run(main())
"""

SERVERS = {
    "socketcomm": """
import sys, socketcomm
server = socketcomm.Server("127.0.0.1", 0, mode="echo", max_connections=20000, backlog=4096)
print(server.address[1], flush=True)
server.serve_forever()
""",
    "uvloop": """
import asyncio, struct, sys, uvloop
HELLO = b"\\x89SCM\\x01\\x01\\x00\\x00" + struct.pack(">I", 16 << 20)
class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.greeted = transport, False
    def data_received(self, data):
        if not self.greeted:
            self.greeted = True
            self.transport.write(HELLO)
            data = data[12:]
        if data:
            self.transport.write(data)
"""
    + UVLOOP_SERVE,
    # The same, for plain sockets: what comes is echoed, no hello.
    "uvloop-raw": """
import asyncio, uvloop
class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
    def data_received(self, data):
        self.transport.write(data)
"""
    + UVLOOP_SERVE,
}

#: What each idle connection did before falling silent, with the servers that serve it: a
#: framed client its hello, a plain socket one message of 1 KiB echoed.
IDLE_SHAPES = {"framed": ("socketcomm", "uvloop"), "raw": ("socketcomm", "uvloop-raw")}
RAW_MESSAGE = bytes(range(256)) * 4

#: How long the connections stay silent before the server's memory is read: a socketcomm
#: connection gives back its loop's state after between 0.5 and 1 s of quiet.
IDLE_SETTLE = 2.0


def raise_descriptor_limit(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, wanted)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, wanted), target), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def start(kind: str) -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen(python_command(SERVERS[kind]), stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    return process, int(process.stdout.readline())


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def stop(process: subprocess.Popen[str]) -> None:
    process.kill()
    process.wait(10)
    if process.stdout:
        process.stdout.close()


def soak_messages(clients: int, messages: int, limit: float) -> dict[str, object]:
    """Every client sends ``messages`` messages carrying (client, sequence, CRC-32 of a random
    body) through the native echo server, 50 in flight, and checks each echo: intact and in
    order."""
    import socketcomm.aio

    process, port = start("socketcomm")
    problems: list[str] = []

    async def one(n: int) -> int:
        async with socketcomm.aio.Client("127.0.0.1", port, timeout=60) as client:
            checked = 0
            window = 50
            for start_seq in range(0, messages, window):
                sent = []
                for seq in range(start_seq, min(messages, start_seq + window)):
                    body = os.urandom(64 + (seq % 200))
                    frame = struct.pack(">III", n, seq, zlib.crc32(body)) + body
                    await client.send(frame)
                    sent.append(frame)
                for expected in sent:
                    got = await client.recv()
                    _, seq, crc = struct.unpack(">III", got[:12])
                    if got != expected or zlib.crc32(got[12:]) != crc:
                        problems.append(f"client {n}: message {seq} corrupted or out of order")
                        return checked
                    checked += 1
            return checked

    async def all_clients() -> list[int]:
        return await asyncio.wait_for(asyncio.gather(*(one(n) for n in range(clients))), limit)

    raise_descriptor_limit(clients + 100)
    started = time.monotonic()
    try:
        counts = asyncio.run(all_clients())
    finally:
        elapsed = time.monotonic() - started
        server_rss = rss_kib(process.pid)
        stop(process)
    total = sum(counts)
    return {
        "soak": "messages",
        "clients": clients,
        "messages_each": messages,
        "checked": total,
        "expected": clients * messages,
        "seconds": round(elapsed, 1),
        "server_rss_mib_at_end": round(server_rss / 1024, 1),
        "ok": total == clients * messages and not problems,
        "problems": problems[:5],
    }


def soak_idle(connections: int) -> dict[str, object]:
    """Opens ``connections`` connections to each server, framed (hello answered, then silent)
    and raw (one message echoed, then silent), and reads the server's RSS and descriptors
    before and after."""
    raise_descriptor_limit(connections + 200)
    results: dict[str, object] = {"soak": "idle", "connections": connections}
    ok = True
    for shape, kinds in IDLE_SHAPES.items():
        measured = {kind: idle_connections(kind, shape, connections) for kind in kinds}
        ours, peer = measured[kinds[0]], measured[kinds[1]]
        ok = ok and ours["still_answers"] and ours["descriptors"] >= connections
        results[shape] = {
            **measured,
            "ratio_to_uvloop": round(
                ours["bytes_per_connection"] / max(1, peer["bytes_per_connection"]), 2
            ),
        }
    results["ok"] = ok
    return results


class Idle(TypedDict):
    rss_before_mib: float
    rss_after_mib: float
    bytes_per_connection: int
    descriptors: int
    still_answers: bool


def idle_connections(kind: str, shape: str, connections: int) -> Idle:
    """One server of ``kind`` holding ``connections`` idle connections of ``shape``."""
    process, port = start(kind)
    socks: list[socket.socket] = []
    try:
        time.sleep(0.5)
        before = rss_kib(process.pid)
        greeting, answer_len = (HELLO, 12) if shape == "framed" else (RAW_MESSAGE, len(RAW_MESSAGE))
        for _ in range(connections):
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.sendall(greeting)
            socks.append(sock)
        for sock in socks:
            answer = b""
            while len(answer) < answer_len:
                chunk = sock.recv(answer_len - len(answer))
                if not chunk:
                    raise RuntimeError(f"{kind} closed an idle connection")
                answer += chunk
            if shape == "raw" and answer != RAW_MESSAGE:
                raise RuntimeError(f"{kind} echoed something else")
        time.sleep(IDLE_SETTLE)
        after = rss_kib(process.pid)
        held = descriptors(process.pid)
        # Still answering after holding them all.
        if shape == "framed":
            socks[0].sendall(struct.pack(">IB", 3, 1) + b"hi")
        else:
            socks[0].sendall(b"hi")
        echo = socks[0].recv(64)
        return {
            "rss_before_mib": round(before / 1024, 1),
            "rss_after_mib": round(after / 1024, 1),
            "bytes_per_connection": round((after - before) * 1024 / connections),
            "descriptors": held,
            "still_answers": echo.endswith(b"hi"),
        }
    finally:
        for sock in socks:
            sock.close()
        stop(process)


def soak_churn(cycles: int) -> dict[str, object]:
    """Connects, exchanges one request and closes, ``cycles`` times, and checks that the
    server's descriptors come back to where they were and its RSS stops growing."""
    import socketcomm

    process, port = start("socketcomm")
    try:
        warm = 500
        for _ in range(warm):
            with socketcomm.Client("127.0.0.1", port, timeout=10) as client:
                client.request("warm")
        time.sleep(0.5)
        fds_before, rss_before = descriptors(process.pid), rss_kib(process.pid)
        started = time.monotonic()
        for n in range(cycles):
            with socketcomm.Client("127.0.0.1", port, timeout=10) as client:
                assert client.request(b"%d" % n) == b"%d" % n
        elapsed = time.monotonic() - started
        time.sleep(1.0)
        fds_after, rss_after = descriptors(process.pid), rss_kib(process.pid)
    finally:
        stop(process)
    growth = rss_after - rss_before
    return {
        "soak": "churn",
        "cycles": cycles,
        "seconds": round(elapsed, 1),
        "descriptors_before": fds_before,
        "descriptors_after": fds_after,
        "rss_before_mib": round(rss_before / 1024, 1),
        "rss_after_mib": round(rss_after / 1024, 1),
        "rss_growth_kib": growth,
        # A leak would grow with the cycles; allow the allocator 256 KiB of slack plus 20 bytes
        # per cycle (a connection's state is kilobytes, so a leak of one would show).
        "ok": fds_after <= fds_before and growth <= 256 + cycles * 20 // 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("which", choices=["messages", "idle", "churn", "all"])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--cycles", type=int, default=20_000)
    parser.add_argument(
        "--limit", type=float, default=900, help="seconds the message soak may take"
    )
    args = parser.parse_args()
    runs: dict[str, Callable[[], dict[str, object]]] = {
        "messages": lambda: soak_messages(args.clients, args.messages, args.limit),
        "idle": lambda: soak_idle(args.connections),
        "churn": lambda: soak_churn(args.cycles),
    }
    failed = False
    for name, soak in runs.items():
        if args.which in (name, "all"):
            result = soak()
            print(json.dumps(result), flush=True)
            failed |= not result["ok"]
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
