"""The socketcomm benchmark: one command that installs what it needs, builds the compiled peers,
runs every server and client in the same run, and prints the ratios of DESIGN.md section 5.

    python benches/run.py --quick            # about 2 minutes
    python benches/run.py                    # longer windows, steadier figures
    python benches/run.py --output report.md # also write the report

Every server row reports throughput and server CPU time per message (utime + stime from
/proc/PID/stat over the measured window, divided by the messages), which does not depend on how
much CPU the load generator left over. The load generator's own CPU is reported too; a row whose
load generator used more than 90% of a core is marked client-bound.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHES = ROOT / "benches"
LOADGEN_DIR = BENCHES / "loadgen"
RELEASE = LOADGEN_DIR / "target" / "release"

ECHO_PEERS = [
    ("tokio", "minimal tokio framed echo (the limit)"),
    ("socketcomm-echo", "socketcomm Server(mode='echo')"),
    ("protocol-echo-uvloop", "asyncio Protocol echo on uvloop"),
    ("protocol-echo", "asyncio Protocol echo, standard loop"),
    ("streams-echo-uvloop", "asyncio streams echo on uvloop"),
    ("streams-echo", "asyncio streams echo, standard loop"),
    ("threaded-echo", "stdlib ThreadingTCPServer echo"),
]
TLS_PEERS = [
    ("socketcomm-tls-echo", "socketcomm Server(mode='echo', tls=...), TLS 1.3"),
    ("tokio-tls", "minimal tokio-rustls framed echo, TLS 1.3 (the limit)"),
    ("socketcomm-echo", "the same server in plaintext"),
    ("protocol-echo-ssl", "asyncio Protocol echo over asyncio ssl, TLS 1.3"),
    ("protocol-echo-ssl-uvloop", "asyncio Protocol echo over ssl on uvloop, TLS 1.3"),
]
HANDLER_PEERS = [
    ("socketcomm-handler", "socketcomm on_message handler"),
    ("socketcomm-pull", "socketcomm pull loop (for event in server)"),
    ("protocol-handler-uvloop", "asyncio Protocol + same handler on uvloop"),
    ("protocol-handler", "asyncio Protocol + same handler, standard loop"),
    ("socketcomm-aio", "socketcomm.aio server on uvloop (async for, await reply)"),
    ("streams-handler-uvloop", "asyncio streams + same handler on uvloop"),
    ("cli-workers-1", "python server.py (reply mode), 1 worker process"),
    ("cli-workers-2", "python server.py (reply mode), --workers 2"),
]


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def publish(report: list[str], output: Path | None) -> None:
    """Prints the report (markdown), and writes it to `output` too if given."""
    text = "\n".join(report) + "\n"
    print(text)
    if output:
        output.write_text(text)


def ensure_tools() -> None:
    """Installs what the benchmark needs and is missing; builds the compiled peers."""
    if importlib.util.find_spec("socketcomm") is None:
        say("installing socketcomm (pip install .)")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", str(ROOT)], check=True)
    if importlib.util.find_spec("uvloop") is None:
        say("installing uvloop from PyPI")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "uvloop"], check=True)
    if shutil.which("iperf3") is None:
        if os.geteuid() == 0 and shutil.which("apt-get"):
            say("installing iperf3 from Debian's packages")
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            subprocess.run(["apt-get", "install", "-y", "-qq", "iperf3"], check=False, env=env)
        else:
            say("iperf3 is missing (apt-get install iperf3); the file-transfer row needs it")
    say("building the load generator and the tokio peer (cargo build --release)")
    subprocess.run(
        [
            "cargo",
            "build",
            "--release",
            "--quiet",
            "--manifest-path",
            str(LOADGEN_DIR / "Cargo.toml"),
        ],
        check=True,
    )


class Peer:
    """A server process that prints `READY <port> [<pid>]` when listening."""

    def __init__(self, kind: str) -> None:
        if kind.startswith("tokio"):
            flag = {"tokio-sink": "--sink", "tokio-raw": "--raw", "tokio-tls": "--tls"}.get(kind)
            flags = [flag] if flag else []
            args = [str(RELEASE / "tokio_echo"), *flags]
        else:
            args = [sys.executable, str(BENCHES / "peers.py"), kind]
        self.kind = kind
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert self.process.stdout is not None
        line = self.process.stdout.readline().split()
        if not line or line[0] != "READY":
            self.stop()
            raise RuntimeError(f"{kind} did not start")
        self.port = int(line[1])
        # Several processes serve some peers (--workers): their CPU time is summed.
        self.pid = line[2] if len(line) > 2 else str(self.process.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout:
            self.process.stdout.close()


@dataclass
class Result:
    kind: str
    label: str
    msgs_per_s: float
    mb_per_s: float
    p50_us: float
    p99_us: float
    server_cpu_us_per_msg: float
    loadgen_cpu: float  # fraction of one core
    # The share of the machine's CPU time the hypervisor gave to others during the row: a row
    # with much of it ran on a machine slower than the others did.
    steal: float = 0.0
    # The kernel's part of server_cpu_us_per_msg (system CPU time): the system calls of each
    # message, which every server pays alike.
    server_system_us_per_msg: float = 0.0

    @property
    def client_bound(self) -> bool:
        return self.loadgen_cpu > 0.9


def make_tls_files() -> Path:
    """A certificate and key (ECDSA P-256, PEM) for the TLS peers, made with openssl."""
    folder = Path(tempfile.mkdtemp(prefix="socketcomm-bench-tls-"))
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(folder / "key.pem"),
            "-out",
            str(folder / "cert.pem"),
        ],
        check=True,
        capture_output=True,
    )
    os.environ["SOCKETCOMM_BENCH_TLS"] = str(folder)
    return folder


def cpu_ticks() -> tuple[int, int]:
    """(all, stolen) CPU ticks of the machine so far, from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(n) for n in stat.readline().split()[1:]]
    return sum(fields), fields[7] if len(fields) > 7 else 0


def run_load(kind: str, label: str, args: argparse.Namespace) -> Result:
    peer = Peer(kind)
    ticks_before = cpu_ticks()
    tls = ["--tls"] if "tls" in kind or "ssl" in kind else []
    shape = ["--depth", str(getattr(args, "depth", 1))]
    if getattr(args, "raw", False):
        shape.append("--raw")
    try:
        completed = subprocess.run(
            [
                str(RELEASE / "loadgen"),
                *tls,
                *shape,
                "--port",
                str(peer.port),
                "--server-pid",
                str(peer.pid),
                "--conns",
                str(args.conns),
                "--size",
                str(args.size),
                "--warmup",
                str(args.warmup),
                "--duration",
                str(args.duration),
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=args.warmup + args.duration + 60,
        )
    finally:
        peer.stop()
    ticks, stolen = (a - b for a, b in zip(cpu_ticks(), ticks_before, strict=True))
    data = json.loads(completed.stdout)
    messages = data["messages"]
    if not messages:
        raise RuntimeError(f"{label}: no message came back; {completed.stderr}")
    return Result(
        kind=kind,
        label=label,
        msgs_per_s=data["msgs_per_s"],
        mb_per_s=data["mb_per_s"],
        p50_us=data["p50_us"],
        p99_us=data["p99_us"],
        server_cpu_us_per_msg=(data["server_cpu_s"] or 0.0) * 1e6 / messages,
        loadgen_cpu=(data["loadgen_cpu_s"] or 0.0) / data["seconds"],
        steal=stolen / ticks if ticks else 0.0,
        server_system_us_per_msg=(data.get("server_system_s") or 0.0) * 1e6 / messages,
    )


def run_client(kind: str, port: int) -> dict[str, float]:
    completed = subprocess.run(
        [sys.executable, str(BENCHES / "clients.py"), kind, str(port)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    result: dict[str, float] = json.loads(completed.stdout)
    return result


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} cores ({model}), Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def table(results: list[Result]) -> list[str]:
    lines = [
        "| server | msgs/s | MB/s | p50 µs | p99 µs | server CPU µs/msg | load generator CPU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        bound = " (client-bound)" if r.client_bound else ""
        lines.append(
            f"| {r.label} | {r.msgs_per_s:,.0f} | {r.mb_per_s:.1f} | {r.p50_us:.0f} | "
            f"{r.p99_us:.0f} | {r.server_cpu_us_per_msg:.2f} | {r.loadgen_cpu:.0%}{bound} |"
        )
    return lines


def goal(name: str, value: float, target: float, higher_is_better: bool) -> str:
    met = value >= target if higher_is_better else value <= target
    sign = ">=" if higher_is_better else "<="
    return f"| {name} | {value:.2f}x | {sign} {target}x | {'met' if met else 'NOT met'} |"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="short windows (about 2 minutes in all)"
    )
    parser.add_argument("--conns", type=int, default=50)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--output", type=Path, help="also write the report (markdown) here")
    args = parser.parse_args()
    args.warmup, args.duration = (1.0, 3.0) if args.quick else (2.0, 10.0)

    ensure_tools()
    started = datetime.datetime.now(datetime.UTC)
    echo, handlers = [], []
    for kind, label in ECHO_PEERS:
        say(f"echo: {label}")
        echo.append(run_load(kind, label, args))
    for kind, label in HANDLER_PEERS:
        say(f"handler: {label}")
        handlers.append(run_load(kind, label, args))
    secure = []
    if shutil.which("openssl"):
        tls_folder = make_tls_files()
        for kind, label in TLS_PEERS:
            say(f"TLS: {label}")
            secure.append(run_load(kind, label, args))
        shutil.rmtree(tls_folder)
    else:
        say("openssl is missing (apt-get install openssl): no TLS rows")

    file_mib = 256 if args.quick else 1024
    say(f"file transfer: {file_mib} MiB, socketcomm / stdlib sendfile + hashlib / iperf3")
    from files import measure as measure_files

    files = measure_files(file_mib)

    say("clients: request round trips and send loops")
    echo_peer = Peer("tokio")
    sink_peer = Peer("tokio-sink")
    try:
        clients = {
            kind: run_client(kind, (sink_peer if kind.startswith("send") else echo_peer).port)
            for kind in (
                "request-socketcomm",
                "request-stdlib",
                "send-socketcomm",
                "send-stdlib",
                "request-aio",
                "request-streams",
            )
        }
    finally:
        echo_peer.stop()
        sink_peer.stop()

    by_kind = {r.kind: r for r in echo + handlers}
    tls_throughput = {r.kind: r.msgs_per_s for r in secure}
    tls_cpu = {r.kind: r.server_cpu_us_per_msg for r in secure}
    throughput = {kind: r.msgs_per_s for kind, r in by_kind.items()}
    cpu = {kind: r.server_cpu_us_per_msg for kind, r in by_kind.items()}
    # (what, measured ratio, goal, whether higher is better), as DESIGN.md section 5 states them.
    goals = [
        ("native echo throughput / tokio", throughput, "socketcomm-echo", "tokio", 0.95, True),
        ("native echo CPU per message / tokio", cpu, "socketcomm-echo", "tokio", 1.05, False),
        (
            "native echo CPU per message / uvloop Protocol",
            cpu,
            "socketcomm-echo",
            "protocol-echo-uvloop",
            0.7,
            False,
        ),
        (
            "on_message throughput / uvloop Protocol + handler",
            throughput,
            "socketcomm-handler",
            "protocol-handler-uvloop",
            1.0,
            True,
        ),
        (
            "on_message CPU per message / uvloop Protocol + handler",
            cpu,
            "socketcomm-handler",
            "protocol-handler-uvloop",
            0.67,
            False,
        ),
        (
            "pull loop throughput / uvloop Protocol + handler",
            throughput,
            "socketcomm-pull",
            "protocol-handler-uvloop",
            1.0,
            True,
        ),
    ]
    request_p50 = {kind: r.get("p50_us", 0.0) for kind, r in clients.items()}
    send_rate = {kind: r["msgs_per_s"] for kind, r in clients.items()}
    goals += [
        (
            "Client.request p50 / stdlib blocking client",
            request_p50,
            "request-socketcomm",
            "request-stdlib",
            1.1,
            False,
        ),
        (
            "Client.send msgs/s / stdlib sendall",
            send_rate,
            "send-socketcomm",
            "send-stdlib",
            2.0,
            True,
        ),
    ]
    goals.append(
        (
            "--workers 2 throughput / 1 worker (reply mode, Python per message)",
            throughput,
            "cli-workers-2",
            "cli-workers-1",
            1.0,
            True,
        )
    )
    # The asyncio API against the same task done with asyncio streams on uvloop (issue 6 sets
    # no figure; parity is the reference).
    goals += [
        (
            "aio server throughput / asyncio streams + handler on uvloop",
            throughput,
            "socketcomm-aio",
            "streams-handler-uvloop",
            1.0,
            True,
        ),
        (
            "aio Client.request p50 / asyncio streams client on uvloop",
            request_p50,
            "request-aio",
            "request-streams",
            1.0,
            False,
        ),
    ]
    # File transfer (DESIGN.md section 5, row 7): MiB/s with the digest verified, in one run.
    goals += [
        (
            f"file transfer {file_mib} MiB / iperf3 single stream",
            files,
            "socketcomm",
            "iperf3",
            0.8,
            True,
        ),
        (
            f"file transfer {file_mib} MiB / stdlib sendfile + hashlib",
            files,
            "socketcomm",
            "stdlib",
            1.5,
            True,
        ),
    ]
    # TLS (DESIGN.md section 5, row 8), measured in the same run: the same server in plaintext,
    # and asyncio's ssl (standard loop); CPU per message shows what encryption costs.
    goals += [
        (
            "TLS echo throughput / the same server in plaintext",
            tls_throughput,
            "socketcomm-tls-echo",
            "socketcomm-echo",
            0.8,
            True,
        ),
        (
            "TLS echo throughput / asyncio + ssl",
            tls_throughput,
            "socketcomm-tls-echo",
            "protocol-echo-ssl",
            2.0,
            True,
        ),
        (
            "TLS echo CPU per message / asyncio + ssl on uvloop",
            tls_cpu,
            "socketcomm-tls-echo",
            "protocol-echo-ssl-uvloop",
            1.0,
            False,
        ),
    ]
    report = [
        f"Run {started:%Y-%m-%d %H:%M} UTC on {machine()}; {args.conns} connections x "
        f"{args.size} B, one message in flight per connection, {args.duration:.0f} s windows "
        f"after {args.warmup:.0f} s warm-up ({'--quick' if args.quick else 'full'}).",
        "",
        "### Goals (DESIGN.md section 5, rows 1 to 6; then workers and the asyncio API)",
        "",
        "| ratio | measured | goal | |",
        "| --- | ---: | ---: | --- |",
        *(
            goal(name, figures[ours] / figures[peer], target, higher)
            for name, figures, ours, peer, target, higher in goals
            # A peer that could not run (iperf3 missing) has no row.
            if peer in figures
        ),
        "",
        "### Echo servers",
        "",
        *table(echo),
        "",
        "### A Python handler per message",
        "",
        *table(handlers),
        "",
        "### TLS (50 connections, TLS 1.3, ECDSA P-256 certificate; the load generator uses "
        "rustls)",
        "",
        *(table(secure) if secure else ["(openssl missing: no TLS rows)"]),
        "",
        f"### File transfer ({file_mib} MiB over loopback, best of 3, timed at the sender "
        "until the receiver verified and renamed it)",
        "",
        "| transfer | MiB/s |",
        "| --- | ---: |",
        *(f"| {name} | {rate:,.0f} |" for name, rate in files.items()),
        "",
        "### Clients (100 B payload, against the minimal tokio peer)",
        "",
        "| client | msgs/s | p50 µs | p99 µs |",
        "| --- | ---: | ---: | ---: |",
    ]
    for kind, result in clients.items():
        p50 = f"{result['p50_us']:.1f}" if "p50_us" in result else "-"
        p99 = f"{result['p99_us']:.1f}" if "p99_us" in result else "-"
        report.append(f"| {kind} | {result['msgs_per_s']:,.0f} | {p50} | {p99} |")
    publish(report, args.output)


if __name__ == "__main__":
    main()
