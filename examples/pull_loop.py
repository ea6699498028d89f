"""The pull loop: iterate over the server's events, or take them in batches with recv_many.

python examples/pull_loop.py
"""

import threading

import socketcomm


def clients(address: tuple[str, int]) -> None:
    with socketcomm.Client(*address, timeout=5) as client:
        for n in range(3):
            print("client got:", client.request(f"question {n}").decode())


def main() -> None:
    with socketcomm.Server("127.0.0.1", 0) as server:
        talking = threading.Thread(target=clients, args=(server.address,))
        talking.start()
        done = False
        while not done:
            # Up to 64 events: waits for the first, then takes what is already queued.
            for event in server.recv_many(max=64, timeout=5):
                if isinstance(event, socketcomm.Connected):
                    print("connected:", event.peer)
                elif isinstance(event, socketcomm.Message):
                    event.reply(b"answer to " + event.data)
                elif isinstance(event, socketcomm.Disconnected):
                    print("disconnected:", event.reason)
                    done = True
        talking.join()
        # The simplest form is a plain loop, which ends when the server is closed:
        #     for event in server: ...


if __name__ == "__main__":
    main()
