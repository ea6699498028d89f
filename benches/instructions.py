"""Instructions per message, counted by valgrind's callgrind: a measure of a hot path that does
not move with the machine's noise, for comparing two versions of the code.

    python benches/instructions.py                           # native echo, raw 50 x 1 KiB
    python benches/instructions.py socketcomm-handler --framed
    python benches/instructions.py socketcomm-pull --seconds 15

Runs one server of benches/peers.py under callgrind (about 50 times slower than natively),
loads it with the load generator for a bounded time, stops it, and prints one JSON object: the
messages served, and the instructions per message executed in the connections' tasks (the
future of `server::handler::serve`, which reads, frames, answers and writes) and in the whole
process (start-up and the interpreter included, so comparable only between runs of the same
kind and length). Needs valgrind (`apt-get install valgrind`). Traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run import BENCHES, RELEASE, ROOT, ensure_tools, say

# callgrind_annotate's inclusive line for the function every connection's task runs in: its
# future's poll (`handler::serve` chooses a plaintext or TLS future, and the poll of that
# choice, an `Either`, is where the plaintext connection's future is inlined).
CONNECTION_TASK = re.compile(
    r"^\s*([\d,]+) .*(server::handler::serve(_on)?::\{\{closure\}\}"
    r"|future::either::Either<A,B> as core::future::future::Future>::poll) "
)
TOTAL = re.compile(r"^\s*([\d,]+) .*PROGRAM TOTALS")


def counted(line_pattern: re.Pattern[str], report: str) -> int:
    for line in report.splitlines():
        if match := line_pattern.match(line):
            return int(match.group(1).replace(",", ""))
    raise RuntimeError(f"callgrind's report has no line for {line_pattern.pattern}")


def measure(kind: str, raw: bool, conns: int, size: int, seconds: float) -> dict[str, object]:
    folder = Path(tempfile.mkdtemp(prefix="socketcomm-callgrind-"))
    out = folder / "callgrind.out"
    server = subprocess.Popen(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            sys.executable,
            str(BENCHES / "peers.py"),
            kind,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline().split()
        if not line or line[0] != "READY":
            raise RuntimeError(f"{kind} did not start under valgrind")
        load = subprocess.run(
            [
                str(RELEASE / "loadgen"),
                "--port",
                line[1],
                "--conns",
                str(conns),
                "--size",
                str(size),
                # No warm-up: every message the server handles is in the count.
                "--warmup",
                "0",
                "--duration",
                str(seconds),
                *(["--raw"] if raw else []),
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + 60,
        )
        messages = int(json.loads(load.stdout)["messages"])
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    deadline = time.monotonic() + 30
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    report = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", str(out)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    shutil.rmtree(folder, ignore_errors=True)
    return {
        "server": kind,
        "shape": f"{'raw' if raw else 'framed'} {conns} x {size} B",
        "seconds": seconds,
        "messages": messages,
        "connection_task_instructions_per_message": round(
            counted(CONNECTION_TASK, report) / max(1, messages)
        ),
        "process_instructions_per_message": round(counted(TOTAL, report) / max(1, messages)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "server", nargs="?", default="socketcomm-echo", help="a socketcomm kind of peers.py"
    )
    parser.add_argument("--framed", action="store_true", help="framed messages (default: raw)")
    parser.add_argument("--conns", type=int, default=50, help="connections (default 50)")
    parser.add_argument("--size", type=int, default=1024, help="message size (default 1024)")
    parser.add_argument("--seconds", type=float, default=8.0, help="load time (default 8)")
    args = parser.parse_args()
    if not args.server.startswith("socketcomm"):
        parser.error("callgrind counts socketcomm's own servers (a socketcomm-... kind)")
    if shutil.which("valgrind") is None or shutil.which("callgrind_annotate") is None:
        sys.exit("valgrind is not installed (apt-get install valgrind)")
    ensure_tools()
    say(f"{args.server} under callgrind for {args.seconds:g} s")
    result = measure(args.server, not args.framed, args.conns, args.size, args.seconds)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
