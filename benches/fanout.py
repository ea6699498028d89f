"""The fan-out benchmark (issue 14): one publisher and many subscribers of one topic, 1 KiB
messages, measured by the compiled load generator (benches/loadgen, `fanout`), which holds
the publisher and every subscriber in one process and speaks each server's own protocol.

Rows, in the same run:
  - socketcomm, native: one Server(mode="broadcast"); the publisher's PUBLISH frames are
    relayed by the Rust core to every subscriber, no Python per message;
  - socketcomm through Redis: two servers joined by a backplane, the publisher on one and
    every subscriber on the other, so each message crosses Redis;
  - Redis pub/sub alone: the same publisher and subscribers on redis-server itself (PUBLISH
    and SUBSCRIBE), the fan-out that redis-py's pub/sub users get from Redis;
  - redis-py: the same publisher and subscribers written with redis-py on asyncio (uvloop),
    as a Python program using Redis pub/sub would (benches/fanout_redis_py.py).

    python benches/fanout.py            # 100 subscribers, 2,000 messages, 3 rounds
    python benches/fanout.py --quick    # 1 round

Each row reports deliveries per second (messages x subscribers), the publish rate, latency
from publish to delivery (p50, p99), and the CPU of the servers and of the load generator.
The load generator keeps the publisher at most 64 messages ahead of the slowest subscriber.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run import RELEASE, Peer, ensure_tools, machine, say

from socketcomm.testing import RedisServer


def cpu_time_of(pid: int) -> float:
    """User plus system CPU seconds of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_server(folder: Path) -> RedisServer:
    """A redis-server of its own, installed from Debian's packages first if it is missing."""
    binary = shutil.which("redis-server")
    if binary is None and os.geteuid() == 0 and shutil.which("apt-get"):
        say("installing redis-server from Debian's packages")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "install", "-y", "-qq", "redis-server"], check=False, env=env)
        binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is missing (apt-get install redis-server)")
    return RedisServer(binary, folder)


def fanout(
    port: int, publish_port: int, pids: list[str], args: argparse.Namespace, redis: bool = False
) -> dict[str, float]:
    command = [
        str(RELEASE / "fanout"),
        "--port",
        str(port),
        "--publish-port",
        str(publish_port),
        "--subscribers",
        str(args.subscribers),
        "--size",
        str(args.size),
        "--messages",
        str(args.messages),
        "--server-pid",
        ",".join(pids),
    ] + (["--redis"] if redis else [])
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, check=True)
    result: dict[str, float] = json.loads(done.stdout)
    return result


def redis_py(redis: RedisServer, args: argparse.Namespace) -> dict[str, float]:
    """The same fan-out as a redis-py user writes it (benches/fanout_redis_py.py)."""
    if importlib.util.find_spec("redis") is None:
        say("installing redis-py from PyPI")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "redis"], check=True)
    before = cpu_time_of(redis.pid)
    command = [
        sys.executable,
        str(Path(__file__).parent / "fanout_redis_py.py"),
        str(redis.port),
        str(args.subscribers),
        str(args.size),
        str(args.messages),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    result: dict[str, float] = json.loads(done.stdout)
    result["server_cpu_s"] = cpu_time_of(redis.pid) - before
    return result


def row(redis: RedisServer, kind: str, args: argparse.Namespace) -> dict[str, float]:
    if kind == "redis-py":
        return redis_py(redis, args)
    if kind == "redis":
        pid = str(redis.pid)
        return fanout(redis.port, redis.port, [pid], args, redis=True)
    if kind == "native":
        peer = Peer("socketcomm-broadcast")
        try:
            return fanout(peer.port, peer.port, [peer.pid], args)
        finally:
            peer.stop()
    os.environ["SOCKETCOMM_BENCH_BACKPLANE"] = redis.url
    try:
        publisher_side, subscriber_side = Peer("socketcomm-broadcast"), Peer("socketcomm-broadcast")
    finally:
        del os.environ["SOCKETCOMM_BENCH_BACKPLANE"]
    try:
        time.sleep(0.5)  # both backplane links up
        pids = [publisher_side.pid, subscriber_side.pid, str(redis.pid)]
        return fanout(subscriber_side.port, publisher_side.port, pids, args)
    finally:
        publisher_side.stop()
        subscriber_side.stop()


ROWS = [
    ("native", "socketcomm, native relay (mode='broadcast')"),
    ("backplane", "socketcomm through Redis (two servers, backplane)"),
    ("redis", "Redis pub/sub alone (redis-server's own fan-out)"),
    ("redis-py", "redis-py on asyncio (uvloop): the same, in Python"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--messages", type=int, default=2000)
    args = parser.parse_args()
    rounds = 1 if args.quick else args.rounds
    ensure_tools()
    folder = tempfile.mkdtemp(prefix="socketcomm-bench-redis-")
    redis = redis_server(Path(folder))
    results: dict[str, list[dict[str, float]]] = {kind: [] for kind, _ in ROWS}
    try:
        for _ in range(rounds):
            for kind, label in ROWS:
                say(f"{label} ...")
                results[kind].append(row(redis, kind, args))
    finally:
        redis.stop()
        shutil.rmtree(folder, ignore_errors=True)
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(
        f"Run {now} on {machine()}, {rounds} round(s), median kept; {args.subscribers} "
        f"subscribers, {args.size} B messages, {args.messages} published.\n"
    )
    print(
        "| path | deliveries/s | published/s | p50 µs | p99 µs | servers' CPU s | "
        "load generator CPU s |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for kind, label in ROWS:
        runs = sorted(results[kind], key=lambda r: r["deliveries_per_s"])
        median = runs[len(runs) // 2]
        spread = ", ".join(f"{r['deliveries_per_s']:,.0f}" for r in results[kind])
        print(
            f"| {label} | {median['deliveries_per_s']:,.0f} ({spread}) | "
            f"{median['published_per_s']:,.0f} | {median['p50_us']:.0f} | "
            f"{median['p99_us']:.0f} | {median['server_cpu_s']:.2f} | "
            f"{median['loadgen_cpu_s']:.2f} |"
        )


if __name__ == "__main__":
    main()
