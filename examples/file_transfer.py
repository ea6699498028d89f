"""Send a file to a server that saves uploads, and get a verified copy back.

    python examples/file_transfer.py [PATH]

Without PATH it sends a few megabytes it makes up. The server saves uploads in a temporary
folder; each side checks the BLAKE3 digest, and the file appears in the folder only once whole.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import socketcomm


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        uploads = Path(tmp, "uploads")
        downloads = Path(tmp, "downloads")
        uploads.mkdir()
        downloads.mkdir()
        if len(sys.argv) > 1:
            source = Path(sys.argv[1])
        else:
            source = Path(tmp, "example.bin")
            source.write_bytes(os.urandom(4 << 20))

        with socketcomm.Server("127.0.0.1", 0, upload_dir=uploads) as server:
            with socketcomm.Client(*server.address, download_dir=downloads, timeout=10) as client:
                sent = client.send_file(source, progress=True)
                print(f"uploaded {sent.name}: {sent.size} bytes, blake3 {sent.digest}")
                for event in server:
                    if isinstance(event, socketcomm.FileReceived):
                        print(f"the server saved {event.path.name} ({event.size} bytes)")
                        back = server.send_file(event.conn_id, event.path, "copy-" + event.name)
                        break
                copy = client.recv_file()
                print(f"downloaded {copy.name}, blake3 {copy.digest}")
                assert copy.digest == back.digest == sent.digest
                assert copy.path.read_bytes() == source.read_bytes()


if __name__ == "__main__":
    main()
