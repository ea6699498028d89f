"""Native modes: the server answers in Rust, with no Python per message.

python examples/native_modes.py
"""

import time

import socketcomm


def main() -> None:
    # echo: every message comes back as it was sent.
    with socketcomm.Server("127.0.0.1", 0, mode="echo") as server:
        with socketcomm.Client(*server.address, timeout=5) as client:
            print("echo:", client.request("hello").decode())

    # ack: every message gets the same answer (by default, the original server's).
    with socketcomm.Server("127.0.0.1", 0, mode="ack", reply="received") as server:
        with socketcomm.Client(*server.address, timeout=5) as client:
            print("ack:", client.request("anything").decode())

    # broadcast: every message goes to every other client (see chat_room.py).
    with socketcomm.Server("127.0.0.1", 0, mode="broadcast") as server:
        with socketcomm.Client(*server.address, timeout=5) as alice:
            with socketcomm.Client(*server.address, timeout=5) as bob:
                while len(server.connections) < 2:
                    time.sleep(0.01)
                alice.send("hi bob")
                print("broadcast:", bob.recv().decode())


if __name__ == "__main__":
    main()
