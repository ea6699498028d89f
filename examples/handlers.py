"""Python handlers: on_message/on_connect/on_disconnect, run by one dispatcher thread that takes
the GIL once per batch of events (never on the network threads). A handler that raises is
logged, and the server keeps serving.

    python examples/handlers.py
"""

from __future__ import annotations

import logging
import threading

import socketcomm


def on_connect(conn_id: int, peer: tuple[str, int]) -> None:
    print(f"connection {conn_id} from {peer[0]}")


def on_message(conn_id: int, data: bytes) -> bytes | None:
    if data == b"fail":
        raise ValueError("this handler does not like 'fail'")
    if data == b"quiet":
        return None  # no answer
    return data.upper()  # the answer: sent as the reply


def on_disconnect(conn_id: int, reason: str) -> None:
    print(f"connection {conn_id} ended: {reason}")


def main() -> None:
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    server = socketcomm.Server(
        "127.0.0.1",
        0,
        on_message=on_message,
        on_connect=on_connect,
        on_disconnect=on_disconnect,
    )
    serving = threading.Thread(target=server.serve_forever)
    serving.start()  # or server.start(): a dispatcher thread of its own
    with socketcomm.Client(*server.address, timeout=5) as client:
        print(client.request("hello").decode())
        client.send("fail")  # logged by the server; it goes on
        client.send("quiet")
        print(client.request("still serving").decode())
    server.close()
    serving.join()


if __name__ == "__main__":
    main()
