"""The Python-handler benchmark: socketcomm serving a Python function per message, next to
asyncio Protocol servers (uvloop and the standard loop) running the same function, in one run.

    python benches/python_handlers.py --quick     # 1 s warm-up, 3 s window: about 6 minutes
    python benches/python_handlers.py             # 2 s and 8 s: about 15 minutes

Four load shapes, each framed (socketcomm's protocol) and raw (plain bytes, as a third-party
load generator sends them): 50 connections x 1 KiB with one message in flight each, and
8 connections x 100 B with 32 in flight each. For each shape it runs the `on_message` server,
the pull loop (`for event in server`), `recv_many`, the asyncio server (`socketcomm.aio` on
uvloop), and the Protocol peers, and prints the ratios that issue 12 asks for; then the native
echo next to the minimal tokio server (no regression of the native modes), and the request
round trips of both clients next to their stdlib and asyncio streams peers.

Every figure is msgs/s with the server's CPU time per message (from /proc over the window),
the kernel's part of it (system time: the reads and writes of each message, which no change in
user space removes, so the goals' "floor" line compares it with uvloop's whole), and
the load generator's own CPU; a row whose load generator used more than 90% of a core was
limited by it, not by the server, and is marked so. "CPU stolen" is the share of the machine's
CPU time the hypervisor gave to other guests during the row: a round with much of it ran on a
slower machine, which is why every row runs several rounds in turn and keeps its median.
"""

from __future__ import annotations

import argparse
import datetime
from dataclasses import dataclass
from pathlib import Path

from run import Peer, Result, ensure_tools, machine, run_client, run_load, say


@dataclass(frozen=True)
class Shape:
    name: str
    conns: int
    size: int
    depth: int
    raw: bool


SHAPES = [
    Shape("framed 50 x 1 KiB", 50, 1024, 1, False),
    Shape("framed 8 x 100 B x 32 in flight", 8, 100, 32, False),
    Shape("raw 50 x 1 KiB", 50, 1024, 1, True),
    Shape("raw 8 x 100 B x 32 in flight", 8, 100, 32, True),
]

SOCKETCOMM = [
    ("socketcomm-handler", "socketcomm on_message"),
    ("socketcomm-pull", "socketcomm pull loop (for event in server)"),
    ("socketcomm-recv-many", "socketcomm recv_many"),
    ("socketcomm-aio", "socketcomm.aio server on uvloop (async for, await reply)"),
]
PEERS = [
    ("protocol-handler-uvloop", "asyncio Protocol + same handler on uvloop"),
    ("protocol-handler", "asyncio Protocol + same handler, standard loop"),
]

CLIENTS = ("request-socketcomm", "request-stdlib", "request-aio", "request-streams")

# (what, the socketcomm row, the peer row, goal, whether higher is better, throughput or CPU)
GOALS = [
    ("on_message throughput", "socketcomm-handler", 1.3, True, "msgs"),
    ("on_message CPU per message", "socketcomm-handler", 0.75, False, "cpu"),
    ("pull loop throughput", "socketcomm-pull", 1.0, True, "msgs"),
    ("recv_many throughput", "socketcomm-recv-many", 1.0, True, "msgs"),
    ("aio.Server throughput", "socketcomm-aio", 1.0, True, "msgs"),
]


def peer_kind(kind: str, shape: Shape) -> str:
    """The Protocol peers parse frames; in raw mode they answer each chunk as it comes."""
    if shape.raw and kind.startswith("protocol-handler"):
        return kind.replace("protocol-handler", "protocol-handler-raw")
    return kind


def row(result: Result) -> str:
    bound = " (load generator bound)" if result.client_bound else ""
    return (
        f"| {result.label}{bound} | {result.msgs_per_s:,.0f} | {result.mb_per_s:.1f} | "
        f"{result.p50_us:.0f} | {result.p99_us:.0f} | {result.server_cpu_us_per_msg:.2f} | "
        f"{result.server_system_us_per_msg:.2f} | {result.loadgen_cpu:.0%} | {result.steal:.0%} |"
    )


HEADER = [
    "| server | msgs/s | MB/s | p50 µs | p99 µs | server CPU µs/msg | of which kernel "
    "| load generator CPU | CPU stolen |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
]


def median_result(results: list[Result]) -> Result:
    """The round with the median throughput (its other figures come with it)."""
    ordered = sorted(results, key=lambda r: r.msgs_per_s)
    return ordered[len(ordered) // 2]


def measure_rows(
    title: str,
    rows: list[tuple[str, str]],
    shape: Shape,
    args: argparse.Namespace,
) -> tuple[dict[str, Result], list[str]]:
    """Every row of one table, `args.rounds` times in turn (so that a slow minute of this
    noisy machine hits every row alike), keeping each row's median round. A row that fails
    is reported with its reason and the others still run."""
    load = argparse.Namespace(
        conns=shape.conns,
        size=shape.size,
        depth=shape.depth,
        raw=shape.raw,
        warmup=args.warmup,
        duration=args.duration,
    )
    rounds: dict[str, list[Result]] = {kind: [] for kind, _ in rows}
    failures: dict[str, str] = {}
    for round_no in range(args.rounds):
        for kind, label in rows:
            if kind in failures:
                continue
            say(f"{title}: {label} (round {round_no + 1} of {args.rounds})")
            try:
                rounds[kind].append(run_load(peer_kind(kind, shape), label, load))
            except Exception as e:
                failures[kind] = f"{type(e).__name__}: {e}"
    results = {kind: median_result(found) for kind, found in rounds.items() if found}
    lines = [f"### {title}", "", *HEADER]
    for kind, label in rows:
        if kind in results:
            lines.append(row(results[kind]))
        else:
            lines.append(f"| {label} | failed: {failures[kind]} | | | | | | | |")
    return results, [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 s warm-up, 3 s windows")
    parser.add_argument(
        "--rounds", type=int, default=3, help="runs of every row, in turn; the median is kept"
    )
    parser.add_argument(
        "--shapes", default="all", help="comma-separated indexes into the four shapes (0-3)"
    )
    parser.add_argument("--no-clients", action="store_true", help="skip the client rows")
    parser.add_argument("--output", type=Path, help="also write the report (markdown) here")
    args = parser.parse_args()
    args.warmup, args.duration = (1.0, 3.0) if args.quick else (2.0, 8.0)
    shapes = SHAPES if args.shapes == "all" else [SHAPES[int(i)] for i in args.shapes.split(",")]
    ensure_tools()
    started = datetime.datetime.now(datetime.UTC)
    report = [
        f"Run {started:%Y-%m-%d %H:%M} UTC on {machine()}; {args.warmup:g} s warm-up, "
        f"{args.duration:g} s windows, median of {args.rounds} rounds.",
        "",
    ]
    goal_lines = ["| shape | ratio | measured | goal | |", "| --- | --- | ---: | ---: | --- |"]
    for shape in shapes:
        results, lines = measure_rows(shape.name, SOCKETCOMM + PEERS, shape, args)
        report += lines
        uvloop = results.get("protocol-handler-uvloop")
        for what, kind, target, higher, figure in GOALS:
            ours = results.get(kind)
            if ours is None or uvloop is None:
                goal_lines.append(f"| {shape.name} | {what} / uvloop | failed | {target} | |")
                continue
            if figure == "msgs":
                ratio = ours.msgs_per_s / uvloop.msgs_per_s
            else:
                ratio = ours.server_cpu_us_per_msg / uvloop.server_cpu_us_per_msg
            met = ratio >= target if higher else ratio <= target
            sign = ">=" if higher else "<="
            goal_lines.append(
                f"| {shape.name} | {what} / uvloop | {ratio:.2f}x | {sign} {target}x | "
                f"{'met' if met else 'NOT met'} |"
            )
        handler = results.get("socketcomm-handler")
        if handler is not None and uvloop is not None:
            # The floor under any CPU-per-message goal: the kernel's part alone (the reads and
            # writes of each message), which no change in user space removes.
            floor = handler.server_system_us_per_msg / uvloop.server_cpu_us_per_msg
            goal_lines.append(
                f"| {shape.name} | on_message kernel CPU per message / uvloop's whole | "
                f"{floor:.2f}x | (floor) | |"
            )

    natives = [("tokio", "minimal tokio echo"), ("socketcomm-echo", "Server(mode='echo')")]
    native, lines = measure_rows("native echo, framed 50 x 1 KiB", natives, SHAPES[0], args)
    report += lines
    if len(native) == 2:
        ours, tokio = native["socketcomm-echo"], native["tokio"]
        ratio = ours.server_cpu_us_per_msg / tokio.server_cpu_us_per_msg
        goal_lines.append(f"| native echo | CPU per message / tokio | {ratio:.2f}x | (info) | |")

    if not args.no_clients:
        say("clients: request round trips")
        echo_peer = Peer("tokio")
        try:
            p50 = {kind: run_client(kind, echo_peer.port)["p50_us"] for kind in CLIENTS}
        finally:
            echo_peer.stop()
        report += [
            "### Request round trips (100 B, against the minimal tokio peer), p50 µs",
            "",
            "| client | p50 µs |",
            "| --- | ---: |",
            *(f"| {kind} | {value:.1f} |" for kind, value in p50.items()),
            "",
        ]
        for what, client, stdlib in [
            ("Client.request p50 / stdlib client", "request-socketcomm", "request-stdlib"),
            ("aio.Client.request p50 / streams on uvloop", "request-aio", "request-streams"),
        ]:
            ratio = p50[client] / p50[stdlib]
            verdict = "met" if ratio <= 1.1 else "NOT met"
            goal_lines.append(f"| clients | {what} | {ratio:.2f}x | <= 1.1x | {verdict} |")

    text = "\n".join(["## Goals", "", *goal_lines, "", *report])
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
