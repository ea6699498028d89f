"""File transfer through the Python API, asyncio and the command line, with real files on disk:
verified by an independent BLAKE3, atomic, resumable, refusing what it should."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import blake3
import pytest

import socketcomm
import socketcomm.aio as aio

from conftest import ServerProcess, run, script_env

PARTIAL_DIR = ".socketcomm-partial"


def make_file(path: Path, size: int) -> Path:
    """A file of ``size`` bytes that are not one repeated byte (a random block, repeated)."""
    block = os.urandom(min(size, 1 << 20) or 1)
    with path.open("wb") as out:
        left = size
        while left:
            out.write(block[: min(left, len(block))])
            left -= min(left, len(block))
    return path


def digest(path: Path) -> str:
    hasher = blake3.blake3()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            hasher.update(chunk)
    return hasher.hexdigest()


def visible(folder: Path) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir() if entry.name != PARTIAL_DIR)


def partial_sizes(folder: Path) -> list[int]:
    return [entry.stat().st_size for entry in (folder / PARTIAL_DIR).iterdir()]


def partial_bytes(folder: Path) -> bytes:
    (partial,) = (folder / PARTIAL_DIR).iterdir()
    return partial.read_bytes()


def settled_partial(folder: Path) -> int:
    """The size of the only partial file once the server has written what was on its way (it
    goes on after the sender has gone)."""
    deadline = time.monotonic() + 10
    last = -1
    while (sizes := partial_sizes(folder)) != [last] and time.monotonic() < deadline:
        last = sizes[0] if len(sizes) == 1 else -1
        time.sleep(0.3)
    assert len(sizes) == 1, sizes
    return sizes[0]


def next_file(server: socketcomm.Server) -> socketcomm.FileReceived:
    while True:
        event = server.recv(timeout=10)
        if isinstance(event, socketcomm.FileReceived):
            return event


def next_connection(server: socketcomm.Server) -> int:
    while True:
        event = server.recv(timeout=10)
        if isinstance(event, socketcomm.Connected):
            return event.conn_id


def test_a_file_arrives_verified_with_progress_reports(tmp_path: Path) -> None:
    source = make_file(tmp_path / "video.mp4", 3_000_017)
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    reports: list[tuple[int, int]] = []
    with socketcomm.Server(upload_dir=uploads) as server:
        with socketcomm.Client(*server.address, timeout=10) as client:
            sent = client.send_file(
                source, progress=lambda done, total: reports.append((done, total))
            )
            # Messages still work on the same connection.
            client.send("after the file")
        received = next_file(server)
        assert server.stats()["files_received"] == 1
    expected = digest(source)
    assert (sent.name, sent.saved_as, sent.size, sent.digest) == (
        "video.mp4",
        "video.mp4",
        3_000_017,
        expected,
    )
    assert sent.resumed_from == 0 and sent.seconds > 0 and sent.rate > 0
    assert reports[-1] == (3_000_017, 3_000_017)
    assert [done for done, _ in reports] == sorted(done for done, _ in reports)
    assert received.name == "video.mp4" and received.digest == expected
    assert received.path == uploads.resolve() / "video.mp4"
    assert received.peer == client.local_address and received.conn_id == 1
    assert digest(received.path) == expected
    assert visible(uploads) == ["video.mp4"] and partial_sizes(uploads) == []


def test_the_server_sends_files_to_a_download_dir(tmp_path: Path) -> None:
    source = make_file(tmp_path / "report.pdf", 500_000)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with socketcomm.Server() as server:
        with socketcomm.Client(*server.address, download_dir=downloads, timeout=10) as client:
            sent = server.send_file(next_connection(server), source, "copy.pdf")
            received = client.recv_file()
            assert (received.name, received.conn_id, received.digest) == (
                "copy.pdf",
                0,
                sent.digest,
            )
            assert received.path.read_bytes() == source.read_bytes()
            with pytest.raises(TimeoutError):
                client.recv_file(timeout=0.1)
        with socketcomm.Client(*server.address, timeout=10):
            with pytest.raises(socketcomm.TransferError) as refused:
                server.send_file(next_connection(server), source)
            assert refused.value.status == "refused"
        assert server.stats()["files_sent"] == 1
        assert server.stats()["transfers_failed"] == 1


def test_refusals_name_their_reason_and_write_nothing(tmp_path: Path) -> None:
    source = make_file(tmp_path / "big.bin", 10_000)
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    with socketcomm.Server(mode="echo") as plain, socketcomm.Client(*plain.address) as client:
        with pytest.raises(socketcomm.TransferError, match="upload_dir") as error:
            client.send_file(source)
        assert error.value.status == "refused"
        assert isinstance(error.value, socketcomm.SocketCommError)
        assert client.request("still here") == b"still here"
    with socketcomm.Server(upload_dir=uploads, max_file_size=4096) as server:
        with socketcomm.Client(*server.address) as client:
            with pytest.raises(socketcomm.TransferError, match="max_file_size") as error:
                client.send_file(source)
            assert error.value.status == "too_large"
            for hostile in ("..", "a\0b", "x" * 300, ""):
                with pytest.raises(socketcomm.TransferError) as error:
                    client.send_file(tmp_path / "big.bin", name=hostile)
                assert error.value.status in ("bad_name", "too_large"), hostile
            with pytest.raises(FileNotFoundError, match=r"missing\.bin"):
                client.send_file(tmp_path / "missing.bin")
            with pytest.raises(IsADirectoryError):
                client.send_file(tmp_path)
            with pytest.raises(TypeError, match="progress"):
                client.send_file(source, progress="yes")  # type: ignore[arg-type]
    assert visible(uploads) == [] and partial_sizes(uploads) == []


def test_hostile_names_are_reduced_to_a_base_name_inside_the_folder(tmp_path: Path) -> None:
    source = make_file(tmp_path / "data", 100)
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    with socketcomm.Server(upload_dir=uploads) as server:
        with socketcomm.Client(*server.address) as client:
            for name in ("../../passwd", "/etc/shadow", "..\\..\\boot.ini", "notes.txt"):
                client.send_file(source, name=name)
            again = client.send_file(source, name="notes.txt")
    assert again.saved_as == "notes (1).txt"
    assert visible(uploads) == ["boot.ini", "notes (1).txt", "notes.txt", "passwd", "shadow"]
    assert sorted(os.listdir(tmp_path)) == ["data", "uploads"]


def test_a_missing_upload_dir_fails_at_start_up(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"upload_dir .*missing"):
        socketcomm.Server(upload_dir=tmp_path / "missing")
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        socketcomm.Server(upload_dir=tmp_path / "file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders anyway")
def test_an_unwritable_upload_dir_fails_at_start_up(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(PermissionError, match="upload_dir"):
        socketcomm.Server(upload_dir=locked)


SENDER = """
import sys, socketcomm
client = socketcomm.Client("127.0.0.1", int(sys.argv[1]), send_buffer=65536)
client.send_file(sys.argv[2])
"""


def kill_mid_upload(
    server: socketcomm.Server, source: Path, uploads: Path, env: dict[str, str]
) -> None:
    """Sends `source` from a process of its own, killed (SIGKILL) once the server holds more
    than 1 MiB of it."""
    port = str(server.address[1])
    sender = subprocess.Popen([sys.executable, "-c", SENDER, port, str(source)], env=env)
    try:
        deadline = time.monotonic() + 20
        while not any(size > (1 << 20) for size in partial_sizes(uploads)):
            assert time.monotonic() < deadline and sender.poll() is None
            time.sleep(0.002)
        sender.send_signal(signal.SIGKILL)
    finally:
        sender.wait(timeout=10)


def test_a_sender_killed_mid_transfer_leaves_nothing_visible_and_resumes(tmp_path: Path) -> None:
    source = make_file(tmp_path / "large.bin", 256 << 20)
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    with socketcomm.Server(upload_dir=uploads, recv_buffer=65536) as server:
        kill_mid_upload(server, source, uploads, script_env())
        # The server notices, keeps the part out of sight, and serves others meanwhile.
        with socketcomm.Client(*server.address, timeout=10) as other:
            other.send_file(make_file(tmp_path / "small.txt", 10))
        held = max(partial_sizes(uploads))
        assert 0 < held < source.stat().st_size
        assert visible(uploads) == ["small.txt"]
        # Sending the same file again continues after what the server holds.
        with socketcomm.Client(*server.address, timeout=10) as client:
            sent = client.send_file(source)
    assert sent.resumed_from >= held > 0
    assert sent.digest == digest(source) == digest(uploads / "large.bin")
    assert partial_sizes(uploads) == []


RESUMER = """
import json, sys, socketcomm
with socketcomm.Client("127.0.0.1", int(sys.argv[1]), timeout=20) as client:
    sent = client.send_file(sys.argv[2])
print(json.dumps({"resumed_from": sent.resumed_from, "saved_as": sent.saved_as}))
"""


def test_another_sender_neither_continues_nor_learns_an_interrupted_upload(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = make_file(tmp_path / "large.bin", 64 << 20)
    other = tmp_path / "other"
    other.mkdir()
    lookalike = make_file(other / "large.bin", 64 << 20)  # same name and size, other bytes
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    # The victim keeps its resume token in a folder of its own, as another user's program would.
    victim_env = script_env(SOCKETCOMM_RESUME_DIR=str(tmp_path / "victim-tokens"))
    with socketcomm.Server(upload_dir=uploads, recv_buffer=65536) as server:
        port = str(server.address[1])
        kill_mid_upload(server, source, uploads, victim_env)
        deadline = time.monotonic() + 10
        while server.connections and time.monotonic() < deadline:
            time.sleep(0.01)
        # Another client offers the same name and size: it starts from byte 0, so it learns
        # nothing of what is held, and the victim's part is left as it was.
        with caplog.at_level(logging.INFO, logger="socketcomm"):
            with socketcomm.Client(*server.address, timeout=20) as intruder:
                theirs = intruder.send_file(lookalike)
        # (Before tokens the server offered it the victim's part, whose digest it then saw
        # differ from its own file's start: "the receiver holds N bytes of ... that differ".)
        assert not [r for r in caplog.records if "the receiver holds" in r.getMessage()]
        assert theirs.resumed_from == 0
        assert theirs.saved_as == "large.bin"
        held = settled_partial(uploads)
        assert 0 < held < 64 << 20
        with source.open("rb") as original:
            assert partial_bytes(uploads) == original.read(held)
        # The victim, started again, continues its own.
        resumed = subprocess.run(
            [sys.executable, "-c", RESUMER, port, str(source)],
            env=victim_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert resumed.returncode == 0, resumed.stderr
    outcome = json.loads(resumed.stdout)
    assert outcome == {"resumed_from": held, "saved_as": "large (1).bin"}
    assert digest(uploads / "large (1).bin") == digest(source)
    assert digest(uploads / "large.bin") == digest(lookalike)
    assert partial_sizes(uploads) == []
    assert not list((tmp_path / "victim-tokens").iterdir()), "the token goes once the file is in"


def test_many_clients_upload_at_once(tmp_path: Path) -> None:
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    sources = [make_file(tmp_path / f"file-{n}.bin", 200_000 + n) for n in range(8)]
    results: dict[int, socketcomm.FileSent] = {}
    with socketcomm.Server(upload_dir=uploads) as server:

        def upload(n: int) -> None:
            with socketcomm.Client(*server.address, timeout=10) as client:
                results[n] = client.send_file(sources[n])

        threads = [threading.Thread(target=upload, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
    assert sorted(results) == list(range(8))
    for n, source in enumerate(sources):
        assert results[n].digest == digest(uploads / source.name) == digest(source)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_asyncio_send_file_recv_file_and_on_file(tmp_path: Path, loop: str) -> None:
    source = make_file(tmp_path / "a.bin", 1_500_000)
    uploads = tmp_path / "uploads"
    downloads = tmp_path / "downloads"
    uploads.mkdir()
    downloads.mkdir()
    seen: list[socketcomm.FileReceived] = []

    async def on_file(conn_id: int, file: socketcomm.FileReceived) -> None:
        seen.append(file)

    async def main() -> None:
        async with aio.Server(upload_dir=uploads, on_file=on_file) as server:
            async with aio.Client(*server.address, download_dir=downloads, timeout=10) as client:
                reports: list[tuple[int, int]] = []
                sent = await client.send_file(source, progress=lambda d, t: reports.append((d, t)))
                assert sent.digest == digest(source)
                assert reports[-1] == (source.stat().st_size,) * 2
                conn_id = next(iter(server.connections))
                back = await server.send_file(conn_id, uploads / "a.bin", "back.bin")
                received = await client.recv_file()
                assert received.digest == back.digest == sent.digest
                assert received.path == downloads.resolve() / "back.bin"
                with pytest.raises(socketcomm.TransferError):
                    await client.send_file(source, name="..")
        assert [file.name for file in seen] == ["a.bin"]

    if loop == "uvloop":
        import uvloop

        uvloop.run(asyncio.wait_for(main(), 60))
    else:
        asyncio.run(asyncio.wait_for(main(), 60))


def test_the_command_line_sends_files_with_a_progress_bar(tmp_path: Path) -> None:
    source = make_file(tmp_path / "photo.jpg", 2_000_000)
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    server = ServerProcess("--upload-dir", str(uploads))
    try:
        port = str(server.port)
        done = run([sys.executable, "client.py", "--port", port, "--file", str(source)])
        assert done.returncode == 0, done.stderr
        expected = digest(source)
        assert "sent 'photo.jpg': 1.9 MiB in " in done.stdout
        assert f"blake3 {expected}" in done.stdout
        assert "100%" in done.stderr and "photo.jpg" in done.stderr
        server.wait_for_line("stdout", rf"received file 'photo.jpg' .*blake3 {expected}")
        again = run([sys.executable, "client.py", "--port", port, "-q", "--file", str(source)])
        assert "saved as 'photo (1).jpg'" in again.stdout and again.stderr == ""
        missing = run([sys.executable, "client.py", "--port", port, "--file", "no-such-file"])
        assert missing.returncode == 1
        assert "no-such-file" in missing.stderr and "No such file" in missing.stderr
    finally:
        code, _, err = server.stop()
    assert code == 0
    assert "2 files received" in err
    assert visible(uploads) == ["photo (1).jpg", "photo.jpg"]


def test_the_command_line_says_when_the_server_takes_no_files(tmp_path: Path) -> None:
    source = make_file(tmp_path / "photo.jpg", 1000)
    server = ServerProcess()
    try:
        done = run([sys.executable, "client.py", "--port", str(server.port), "--file", str(source)])
    finally:
        server.stop()
    assert done.returncode == 1
    assert "upload_dir" in done.stderr


def test_upload_dir_from_the_environment_and_a_missing_one_at_start_up(tmp_path: Path) -> None:
    missing = run(
        [sys.executable, "server.py", "--port", "0", "--upload-dir", str(tmp_path / "nope")], 20
    )
    assert missing.returncode == 1
    assert "upload_dir" in missing.stderr and "nope" in missing.stderr
    assert "Traceback" not in missing.stderr
    shown = run([sys.executable, "server.py", "--print-config"], 20, SOCKETCOMM_UPLOAD_DIR="/srv")
    assert 'upload_dir = "/srv"  # environment $SOCKETCOMM_UPLOAD_DIR' in shown.stdout


def test_messages_are_not_held_up_behind_a_large_file(tmp_path: Path) -> None:
    source = make_file(tmp_path / "large.bin", 512 << 20)
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    reports: list[int] = []
    with socketcomm.Server(upload_dir=uploads, on_message=lambda conn, data: data) as server:
        server.start()
        with socketcomm.Client(*server.address, timeout=20) as client:
            upload = threading.Thread(
                target=client.send_file,
                args=(source,),
                kwargs={"progress": lambda done, total: reports.append(done)},
            )
            upload.start()
            while not reports or reports[-1] == 0:
                time.sleep(0.001)
            # The file is flowing: a request on the same connection is answered before it ends.
            answers = [client.request(f"ping {n}") for n in range(5)]
            still_uploading = upload.is_alive()
            upload.join(timeout=60)
    assert answers == [f"ping {n}".encode() for n in range(5)]
    assert still_uploading, "the file finished first; the test proves nothing"
    assert digest(uploads / "large.bin") == digest(source)


def test_a_file_drop_server_serves_forever_without_a_handler(tmp_path: Path) -> None:
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    source = make_file(tmp_path / "drop.bin", 200_001)
    server = socketcomm.Server(upload_dir=uploads)
    serving = threading.Thread(target=server.serve_forever)
    serving.start()
    try:
        with socketcomm.Client(*server.address, timeout=10) as client:
            client.send("a message nobody answers is read and dropped")
            sent = client.send_file(source)
        assert (uploads / sent.saved_as).read_bytes() == source.read_bytes()
        assert server.stats()["files_received"] == 1
    finally:
        server.close()
        serving.join(timeout=10)
    assert not serving.is_alive()


def test_serve_forever_without_handler_mode_or_upload_dir_is_refused() -> None:
    with socketcomm.Server() as server:
        with pytest.raises(ValueError, match="nothing would answer messages"):
            server.serve_forever()
