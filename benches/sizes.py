"""Echo at every message size: socketcomm's native echo next to the minimal tokio server, uvloop
and the standard asyncio loop, framed and on plain sockets, from 100 B to 1 MiB, with one
connection, with 50, and pipelined (8 connections, 16 messages in flight each).

    python benches/sizes.py --quick                     # about 6 minutes
    python benches/sizes.py                             # longer windows, about 13 minutes
    python benches/sizes.py --sizes 65536,1048576 --shapes 50 --framings raw
    python benches/sizes.py --quick --framings tls      # TLS 1.3: against tokio-rustls

Each row is one server process and one run of the load generator (benches/loadgen), which
reports messages/s, MB/s (payload bytes echoed, one way), latency and the CPU time of both
processes over the measured window. A row that fails (the server did not start, the load
generator got nothing back or stopped) is reported as failed with its reason, and the others
are still measured. iperf3's single stream over loopback is measured first, as the ceiling for
large messages: an echo moves every byte both ways, so its one-way MB/s can reach at most
about half of it with the load generator and the server on two cores. The `tls` framing runs
framed messages over TLS 1.3 (a certificate made with openssl) against a minimal tokio-rustls
echo, next to the same socketcomm server in plaintext.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from files import run_iperf3
from run import Result, ensure_tools, machine, make_tls_files, publish, run_load, say

SIZES = [100, 1024, 16 * 1024, 64 * 1024, 256 * 1024, 1024 * 1024]


@dataclass(frozen=True)
class Shape:
    name: str
    conns: int
    depth: int

    def describe(self) -> str:
        if self.depth == 1:
            plural = "s" if self.conns > 1 else ""
            return f"{self.conns} connection{plural}, one message in flight"
        return f"{self.conns} connections, {self.depth} messages in flight each"


SHAPES = {
    "1": Shape("1", 1, 1),
    "50": Shape("50", 50, 1),
    "pipelined": Shape("pipelined", 8, 16),
}

# (kind for benches/peers.py or run.Peer, column title); the first is the reference.
PEERS = {
    "framed": [
        ("tokio", "tokio"),
        ("socketcomm-echo", "socketcomm"),
        ("protocol-echo-uvloop", "uvloop"),
        ("protocol-echo", "asyncio"),
    ],
    "raw": [
        ("tokio-raw", "tokio"),
        ("socketcomm-echo", "socketcomm"),
        ("protocol-echo-raw-uvloop", "uvloop"),
        ("protocol-echo-raw", "asyncio"),
    ],
    "tls": [
        ("tokio-tls", "tokio-rustls"),
        ("socketcomm-tls-echo", "socketcomm"),
        ("socketcomm-echo", "socketcomm in plaintext"),
    ],
}


@dataclass
class Failed:
    label: str
    reason: str


def measure(
    kind: str, label: str, size: int, shape: Shape, raw: bool, quick: bool
) -> Result | Failed:
    load = argparse.Namespace(
        conns=shape.conns,
        depth=shape.depth,
        size=size,
        raw=raw,
        warmup=0.5 if quick else 1.0,
        duration=1.0 if quick else 3.0,
    )
    try:
        return run_load(kind, label, load)
    except subprocess.CalledProcessError as error:
        lines = [line for line in (error.stderr or "").splitlines() if line.strip()]
        # The load generator's panic message is the line after "panicked at".
        reason = next(
            (lines[i + 1] for i, line in enumerate(lines[:-1]) if "panicked at" in line),
            lines[-1] if lines else f"exit code {error.returncode}",
        )
        return Failed(label, f"the load generator stopped: {reason.strip()}")
    except subprocess.TimeoutExpired:
        return Failed(label, "the load generator did not finish in time")
    except (RuntimeError, OSError, ValueError) as error:
        return Failed(label, str(error).strip().splitlines()[0])


def cell(result: Result | Failed) -> str:
    if isinstance(result, Failed):
        return "failed"
    bound = "*" if result.client_bound else ""
    return f"{result.msgs_per_s:,.0f}{bound} ({result.mb_per_s:,.0f} MB/s)"


def ratio(ours: Result | Failed, peer: Result | Failed, cpu: bool = False) -> str:
    if isinstance(ours, Failed) or isinstance(peer, Failed):
        return "-"
    if cpu:
        if not peer.server_cpu_us_per_msg:
            return "-"
        return f"{ours.server_cpu_us_per_msg / peer.server_cpu_us_per_msg:.2f}x"
    return f"{ours.msgs_per_s / peer.msgs_per_s:.2f}x"


def section(
    framing: str, shape: Shape, sizes: list[int], rows: dict[int, list[Result | Failed]]
) -> list[str]:
    titles = [title for _, title in PEERS[framing]]
    lines = [
        f"### {framing}, {shape.describe()}",
        "",
        "| size | " + " | ".join(titles) + " | socketcomm / tokio | CPU per message / tokio |",
        "| ---: | " + " | ".join("---:" for _ in titles) + " | ---: | ---: |",
    ]
    for size in sizes:
        results = rows[size]
        lines.append(
            f"| {size:,} B | "
            + " | ".join(cell(r) for r in results)
            + f" | {ratio(results[1], results[0])} | {ratio(results[1], results[0], cpu=True)} |"
        )
    failures = [
        f"- {size:,} B, {r.label}: {r.reason}"
        for size in sizes
        for r in rows[size]
        if isinstance(r, Failed)
    ]
    return [*lines, "", *failures, *([""] if failures else [])]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short windows (0.5 s + 1 s)")
    parser.add_argument(
        "--sizes",
        default=",".join(map(str, SIZES)),
        help="message sizes in bytes, comma-separated (default: %(default)s)",
    )
    parser.add_argument(
        "--shapes",
        default=",".join(SHAPES),
        help="connection shapes, comma-separated, of: " + ", ".join(SHAPES),
    )
    parser.add_argument(
        "--framings",
        default="framed,raw",
        help="framed, raw and tls (TLS 1.3), comma-separated (default: %(default)s)",
    )
    parser.add_argument("--output", type=Path, help="also write the report (markdown) here")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    try:
        shapes = [SHAPES[name] for name in args.shapes.split(",")]
    except KeyError as error:
        parser.error(f"unknown shape {error}; the shapes are {', '.join(SHAPES)}")
    framings = args.framings.split(",")
    if unknown := set(framings) - set(PEERS):
        parser.error(f"unknown framing {', '.join(unknown)}; they are framed, raw and tls")
    tls_folder = make_tls_files() if "tls" in framings else None

    ensure_tools()
    started = datetime.datetime.now(datetime.UTC)
    say("iperf3: one stream over loopback (the ceiling)")
    iperf_mib = 1024 if not args.quick else 256
    seconds = run_iperf3(iperf_mib)
    ceiling = (
        f"{iperf_mib * (1 << 20) / seconds / 1e6:,.0f} MB/s"
        if seconds
        else "not measured (iperf3 is missing or failed)"
    )
    report = [
        f"Run {started:%Y-%m-%d %H:%M} UTC on {machine()}, "
        f"{'--quick (0.5 s warm-up, 1 s windows)' if args.quick else '1 s warm-up, 3 s windows'}.",
        f"iperf3 single stream over loopback: {ceiling}. Cells: messages/s echoed (payload MB/s, "
        "one way); * marks a row whose load generator used more than 90% of a core (it, not the "
        "server, was the limit).",
        "",
    ]
    for framing in framings:
        for shape in shapes:
            rows: dict[int, list[Result | Failed]] = {}
            for size in sizes:
                say(f"{framing}, {shape.describe()}, {size:,} B")
                rows[size] = [
                    measure(kind, title, size, shape, framing == "raw", args.quick)
                    for kind, title in PEERS[framing]
                ]
            report += section(framing, shape, sizes, rows)
    if tls_folder:
        shutil.rmtree(tls_folder)
    publish(report, args.output)


if __name__ == "__main__":
    main()
