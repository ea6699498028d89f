"""Where a file transfer's CPU goes, thread by thread: one 1 GiB `send_file` from this process
to a `Server(upload_dir=...)` subprocess over loopback, and the CPU time each thread of both
processes spent meanwhile (from /proc/PID/task/TID/stat, in milliseconds, by thread name).

    python benches/file_threads.py [--rounds N] [--size MIB]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import socketcomm

RECEIVER = """
import sys, socketcomm
server = socketcomm.Server("127.0.0.1", 0, upload_dir=sys.argv[1])
print(server.address[1], flush=True)
for event in server:
    if isinstance(event, socketcomm.FileReceived):
        break
server.close()
"""

Ticks = dict[str, tuple[str, int]]


def threads(pid: int) -> Ticks:
    """Each thread's name and CPU ticks (user + system) so far."""
    found: Ticks = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            name = (task / "comm").read_text().strip()
        except OSError:
            continue  # the thread ended
        fields = stat[stat.rindex(")") + 2 :].split()
        found[task.name] = (name, int(fields[11]) + int(fields[12]))
    return found


def spent(before: Ticks, after: Ticks) -> dict[str, list[int]]:
    """Milliseconds of CPU per thread between the two readings, by thread name."""
    tick_ms = 1000 // os.sysconf("SC_CLK_TCK")
    by_name: dict[str, list[int]] = {}
    for tid, (name, ticks) in after.items():
        used = ticks - before.get(tid, (name, 0))[1]
        if used:
            by_name.setdefault(name, []).append(used * tick_ms)
    return {name: sorted(ms, reverse=True) for name, ms in sorted(by_name.items())}


def once(size_mib: int) -> str:
    folder = Path(tempfile.mkdtemp(prefix="socketcomm-bench-"))
    try:
        source = folder / "source.bin"
        block = os.urandom(1 << 20)
        with source.open("wb") as out:
            for _ in range(size_mib):
                out.write(block)
        os.sync()
        uploads = folder / "uploads"
        uploads.mkdir()
        receiver = subprocess.Popen(
            [sys.executable, "-c", RECEIVER, str(uploads)], stdout=subprocess.PIPE, text=True
        )
        assert receiver.stdout is not None
        port = int(receiver.stdout.readline())
        with socketcomm.Client("127.0.0.1", port) as client:
            sender_before, receiver_before = threads(os.getpid()), threads(receiver.pid)
            started = time.perf_counter()
            client.send_file(source)
            seconds = time.perf_counter() - started
            sender_after, receiver_after = threads(os.getpid()), threads(receiver.pid)
        receiver.wait(timeout=60)
        return (
            f"{size_mib / seconds:,.0f} MiB/s ({seconds:.3f} s); CPU ms by thread: "
            f"sender {spent(sender_before, sender_after)}, "
            f"receiver {spent(receiver_before, receiver_after)}"
        )
    finally:
        shutil.rmtree(folder)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="transfers (default: 3)")
    parser.add_argument("--size", type=int, default=1024, help="MiB (default: 1024)")
    args = parser.parse_args()
    for _ in range(args.rounds):
        print(once(args.size), flush=True)


if __name__ == "__main__":
    main()
