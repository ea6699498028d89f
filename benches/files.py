"""The file-transfer row: one file over loopback, digest verified on arrival, against iperf3's
single stream (the raw TCP limit, no disk and no digest) and a stdlib transfer
(``socket.sendfile`` + ``hashlib``), measured in the same run.

    python benches/files.py --size 1024     # MiB; run.py calls it with 1024 (256 with --quick)

Each transfer is timed at the sender, from the call until the receiver has verified the
digest and renamed the file into place, so every figure includes the receiver's disk writes
and hashing. The receivers write to a folder on the same file system; the source file is read
from the page cache (it was just written).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from socketcomm._lifetime import python_command

MiB = 1 << 20

# The stdlib peer's receiver: a size, the bytes, then the sender's digest; it answers b"ok"
# once the digest it computed matches and the file is renamed into place.
STDLIB_RECEIVER = r"""
import hashlib, os, socket, struct, sys
folder = sys.argv[1]
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
conn, _ = listener.accept()
header = conn.recv(8, socket.MSG_WAITALL)
size = struct.unpack("!Q", header)[0]
hasher = hashlib.sha256()
partial = os.path.join(folder, ".partial")
buffer = bytearray(1 << 20)
view = memoryview(buffer)
with open(partial, "wb") as out:
    left = size
    while left:
        n = conn.recv_into(view[: min(left, len(buffer))])
        if n == 0:
            sys.exit("the sender went away")
        out.write(view[:n])
        hasher.update(view[:n])
        left -= n
digest = conn.recv(32, socket.MSG_WAITALL)
if digest != hasher.digest():
    os.remove(partial)
    conn.sendall(b"no")
    sys.exit("digest mismatch")
os.rename(partial, os.path.join(folder, "received.bin"))
conn.sendall(b"ok")
"""

SOCKETCOMM_RECEIVER = r"""
import sys, socketcomm
server = socketcomm.Server("127.0.0.1", 0, upload_dir=sys.argv[1])
print(server.address[1], flush=True)
for event in server:
    if isinstance(event, socketcomm.FileReceived):
        break
server.close()
"""


def make_source(folder: Path, size_mib: int) -> Path:
    path = folder / "source.bin"
    block = os.urandom(MiB)
    with path.open("wb") as out:
        for _ in range(size_mib):
            out.write(block)
    return path


def start_receiver(code: str, folder: Path) -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen(python_command(code, str(folder)), stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    return process, int(process.stdout.readline())


def run_socketcomm(source: Path, folder: Path) -> float:
    import socketcomm

    receiver, port = start_receiver(SOCKETCOMM_RECEIVER, folder)
    try:
        with socketcomm.Client("127.0.0.1", port) as client:
            started = time.perf_counter()
            client.send_file(source, "received.bin")
            elapsed = time.perf_counter() - started
    finally:
        receiver.wait(timeout=120)
    return elapsed


def run_stdlib(source: Path, folder: Path) -> float:
    receiver, port = start_receiver(STDLIB_RECEIVER, folder)
    try:
        with socket.create_connection(("127.0.0.1", port)) as sock, source.open("rb") as file:
            started = time.perf_counter()
            size = os.fstat(file.fileno()).st_size
            digest: list[bytes] = []

            def hash_file() -> None:
                # hashlib releases the GIL on large updates: hashing overlaps the sendfile.
                hasher = hashlib.sha256()
                with source.open("rb") as again:
                    while chunk := again.read(MiB):
                        hasher.update(chunk)
                digest.append(hasher.digest())

            hashing = threading.Thread(target=hash_file)
            hashing.start()
            sock.sendall(struct.pack("!Q", size))
            sock.sendfile(file)
            hashing.join()
            sock.sendall(digest[0])
            answer = sock.recv(2, socket.MSG_WAITALL)
            elapsed = time.perf_counter() - started
        assert answer == b"ok", answer
    finally:
        receiver.wait(timeout=120)
    return elapsed


def run_iperf3(size_mib: int) -> float | None:
    """Seconds iperf3 takes to move the same number of bytes over one loopback stream."""
    if shutil.which("iperf3") is None:
        return None
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        ["iperf3", "-s", "-1", "-B", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            done = subprocess.run(
                ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-n", f"{size_mib}M", "-J"],
                capture_output=True,
                text=True,
            )
            received = json.loads(done.stdout or "{}").get("end", {}).get("sum_received")
            if received:
                return size_mib * MiB * 8 / float(received["bits_per_second"])
            if time.monotonic() > deadline:
                print(f"iperf3 failed: {done.stdout[-500:]}{done.stderr}", file=sys.stderr)
                return None
            time.sleep(0.2)  # the server was not listening yet
    finally:
        server.terminate()
        server.wait(timeout=30)


def measure(size_mib: int, rounds: int = 3) -> dict[str, float]:
    """MiB/s of each transfer, the best of ``rounds`` (the machine's noise only slows down)."""
    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="socketcomm-bench-") as tmp:
        source = make_source(Path(tmp), size_mib)
        for name, run in (("socketcomm", run_socketcomm), ("stdlib", run_stdlib)):
            best = float("inf")
            for _ in range(rounds):
                folder = Path(tempfile.mkdtemp(dir=tmp))
                best = min(best, run(source, folder))
                shutil.rmtree(folder)
            rates[name] = size_mib / best
        times = [t for t in (run_iperf3(size_mib) for _ in range(rounds)) if t is not None]
        if times:
            rates["iperf3"] = size_mib / min(times)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="MiB (default: %(default)s)")
    args = parser.parse_args()
    for name, rate in measure(args.size).items():
        print(f"{name}: {rate:,.0f} MiB/s")


if __name__ == "__main__":
    main()
