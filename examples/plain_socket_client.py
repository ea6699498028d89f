"""A socketcomm client in the Python standard library alone: how another language talks to a
socketcomm server. The wire format is in docs/protocol.md.

    python examples/plain_socket_client.py --port 10101 "Hello World"
    python examples/plain_socket_client.py --port 10101 --subscribe "news.>" --count 3
"""

from __future__ import annotations

import argparse
import socket
import struct

MAGIC = b"\x89SCM"
VERSION = 1
TOPICS_VERSION = 2  # version 2 adds topics (SUBSCRIBE, PUBLISH, TOPIC_ACK)
MAX_FRAME = 16 * 1024 * 1024

DATA, REQUEST, REPLY, PING, PONG, CLOSE = 0x01, 0x02, 0x03, 0x20, 0x21, 0x30
SUBSCRIBE, PUBLISH, TOPIC_ACK = 0x40, 0x42, 0x43


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


def handshake(sock: socket.socket, highest: int = VERSION) -> int:
    """Sends our hello (versions 1 to `highest`), checks the server's; returns the version
    the server chose."""
    sock.sendall(MAGIC + bytes([VERSION, highest]) + b"\0\0" + struct.pack(">I", MAX_FRAME))
    answer = recv_exactly(sock, 12)
    if answer[:4] != MAGIC:
        raise ProtocolError(f"not a socketcomm server: it sent {answer!r}")
    chosen = answer[4]
    if chosen != answer[5] or not VERSION <= chosen <= highest:
        raise ProtocolError(f"the server speaks none of versions {VERSION} to {highest}")
    return chosen


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


def subscribe(sock: socket.socket, request_id: int, topic: str) -> None:
    """Subscribes to `topic` and waits for the server's TOPIC_ACK (status 0 or 1: done)."""
    send_frame(sock, SUBSCRIBE, struct.pack(">I", request_id) + topic.encode())
    while True:
        kind, body = recv_frame(sock)
        if kind == TOPIC_ACK and struct.unpack(">I", body[:4])[0] == request_id:
            if body[4] > 1:
                raise ProtocolError(f"subscription refused: {body[5:].decode()}")
            return
        if kind == PING:
            send_frame(sock, PONG, body)


def published(sock: socket.socket) -> tuple[str, bytes]:
    """The next message published to a topic this client subscribed to: (topic, payload)."""
    while True:
        kind, body = recv_frame(sock)
        if kind == PUBLISH:
            length = body[0]
            return body[1 : 1 + length].decode(), body[1 + length :]
        if kind == PING:
            send_frame(sock, PONG, body)
        elif kind == CLOSE:
            (code,) = struct.unpack(">H", body[:2])
            raise ConnectionError(f"closed by the server ({code}): {body[2:].decode()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("message", nargs="?", default="Hello World")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=10101)
    parser.add_argument("--subscribe", metavar="TOPIC", help="print what is published to it")
    parser.add_argument("--count", type=int, default=1, help="with --subscribe: how many")
    args = parser.parse_args()
    with socket.create_connection((args.host, args.port), timeout=10) as sock:
        if args.subscribe:
            if handshake(sock, highest=TOPICS_VERSION) < TOPICS_VERSION:
                raise ProtocolError("the server speaks protocol version 1: it has no topics")
            subscribe(sock, 1, args.subscribe)
            print(f"subscribed to {args.subscribe}", flush=True)
            for _ in range(args.count):
                topic, payload = published(sock)
                print(f"{topic}: {payload.decode('utf-8', errors='replace')}", flush=True)
        else:
            handshake(sock)
            print(request(sock, 1, args.message.encode()).decode("utf-8", errors="replace"))
        send_frame(sock, CLOSE, struct.pack(">H", 1000) + b"done")


if __name__ == "__main__":
    main()
