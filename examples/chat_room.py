"""A chat room: the server relays every message to every other client, natively.

The same from the command line, in three terminals:
    python server.py --mode broadcast
    python client.py -i        # type lines; /quit leaves
    python client.py -i

    python examples/chat_room.py
"""

import time

import socketcomm


def main() -> None:
    with socketcomm.Server("127.0.0.1", 0, mode="broadcast") as room:
        people = {name: socketcomm.Client(*room.address, timeout=5) for name in ("ann", "bo", "cy")}
        while len(room.connections) < len(people):
            time.sleep(0.01)
        people["ann"].send("ann: hello, room")
        for name in ("bo", "cy"):
            print(f"{name} hears {people[name].recv().decode()!r}")
        for client in people.values():
            client.close()


if __name__ == "__main__":
    main()
