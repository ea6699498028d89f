"""Latency at one shape against the minimal tokio peer, framed and raw, in alternating rounds:

    python benches/latency.py                  # 50 connections x 16 KiB, one message in flight
    python benches/latency.py --size 1024 --rounds 5

Each round runs the tokio peer and socketcomm's native echo one after the other (the order
alternating between rounds), each in its own process, with the load generator of run.py; the
report gives each round's p50 and p99 round trip and messages/s, and the median of the rounds'
ratios to tokio. Traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import statistics

from run import Result, ensure_tools, machine, run_load, say

PEERS = {
    "framed": [("tokio", "tokio"), ("socketcomm-echo", "socketcomm")],
    "raw": [("tokio-raw", "tokio"), ("socketcomm-echo", "socketcomm")],
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=16384, help="message size (default 16384)")
    parser.add_argument("--conns", type=int, default=50, help="connections (default 50)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--duration", type=float, default=3.0, help="window, s (default 3)")
    args = parser.parse_args()
    ensure_tools()
    print(f"{machine()}; {args.conns} connections x {args.size} B, one message in flight.")
    print()
    print(
        "| framing | round | tokio p50 / p99 µs | socketcomm p50 / p99 µs | p99 / tokio "
        "| msgs/s / tokio |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for framing, peers in PEERS.items():
        p99_ratios, rate_ratios = [], []
        for round_ in range(args.rounds):
            order = peers if round_ % 2 == 0 else peers[::-1]
            results: dict[str, Result] = {}
            for kind, label in order:
                say(f"{framing} round {round_ + 1}: {label}")
                load = argparse.Namespace(
                    conns=args.conns,
                    depth=1,
                    size=args.size,
                    raw=framing == "raw",
                    warmup=1.0,
                    duration=args.duration,
                )
                results[label] = run_load(kind, label, load)
            tokio, ours = results["tokio"], results["socketcomm"]
            p99_ratios.append(ours.p99_us / tokio.p99_us)
            rate_ratios.append(ours.msgs_per_s / tokio.msgs_per_s)
            print(
                f"| {framing} | {round_ + 1} | {tokio.p50_us:,.0f} / {tokio.p99_us:,.0f} "
                f"| {ours.p50_us:,.0f} / {ours.p99_us:,.0f} | {p99_ratios[-1]:.2f}x "
                f"| {rate_ratios[-1]:.2f}x |",
                flush=True,
            )
        print(
            f"| {framing} | median | | | {statistics.median(p99_ratios):.2f}x "
            f"| {statistics.median(rate_ratios):.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
