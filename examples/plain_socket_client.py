"""A socketcomm client in the Python standard library alone: how another language talks to a
socketcomm server. The wire format is in docs/protocol.md.

    python examples/plain_socket_client.py --port 10101 "Hello World"
"""

from __future__ import annotations

import argparse
import socket
import struct

MAGIC = b"\x89SCM"
VERSION = 1
MAX_FRAME = 16 * 1024 * 1024

DATA, REQUEST, REPLY, PING, PONG, CLOSE = 0x01, 0x02, 0x03, 0x20, 0x21, 0x30


class ProtocolError(Exception):
    pass


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the server closed the connection")
        data += chunk
    return data


def handshake(sock: socket.socket) -> int:
    """Sends our hello, checks the server's; returns the server's max_frame."""
    sock.sendall(MAGIC + bytes([VERSION, VERSION]) + b"\0\0" + struct.pack(">I", MAX_FRAME))
    answer = recv_exactly(sock, 12)
    if answer[:4] != MAGIC:
        raise ProtocolError(f"not a socketcomm server: it sent {answer!r}")
    if answer[4] != VERSION or answer[5] != VERSION:
        raise ProtocolError(f"the server refused version {VERSION}")
    (server_max_frame,) = struct.unpack(">I", answer[8:12])
    return int(server_max_frame)


def send_frame(sock: socket.socket, kind: int, body: bytes) -> None:
    sock.sendall(struct.pack(">IB", 1 + len(body), kind) + body)


def recv_frame(sock: socket.socket) -> tuple[int, bytes]:
    (length,) = struct.unpack(">I", recv_exactly(sock, 4))
    if not 1 <= length <= MAX_FRAME:
        raise ProtocolError(f"bad frame length {length}")
    frame = recv_exactly(sock, length)
    return frame[0], frame[1:]


def request(sock: socket.socket, request_id: int, message: bytes) -> bytes:
    """Sends a request and returns the reply with the same correlation id."""
    send_frame(sock, REQUEST, struct.pack(">I", request_id) + message)
    while True:
        kind, body = recv_frame(sock)
        if kind == REPLY and struct.unpack(">I", body[:4])[0] == request_id:
            return body[4:]
        if kind == PING:
            send_frame(sock, PONG, body)
        elif kind == CLOSE:
            (code,) = struct.unpack(">H", body[:2])
            raise ConnectionError(f"closed by the server ({code}): {body[2:].decode()}")
        # DATA frames are messages the server sent unasked; this small client ignores them.


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("message", nargs="?", default="Hello World")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=10101)
    args = parser.parse_args()
    with socket.create_connection((args.host, args.port), timeout=10) as sock:
        handshake(sock)
        print(request(sock, 1, args.message.encode()).decode("utf-8", errors="replace"))
        send_frame(sock, CLOSE, struct.pack(">H", 1000) + b"done")


if __name__ == "__main__":
    main()
