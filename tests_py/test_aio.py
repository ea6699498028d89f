"""socketcomm.aio on the standard event loop and on uvloop, over real loopback sockets."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvloop

import socketcomm
import socketcomm.aio as aio

from conftest import echo_under_backpressure

Runner = Callable[[Callable[[], Awaitable[Any]]], Any]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner:
    """Runs a coroutine function to completion on the loop under test, with a time limit."""

    def runner(main: Callable[[], Awaitable[Any]]) -> Any:
        async def bounded() -> Any:
            return await asyncio.wait_for(main(), 60)

        if request.param == "uvloop":
            return uvloop.run(bounded())
        return asyncio.run(bounded())

    return runner


def test_send_recv_request_and_iteration(run: Runner) -> None:
    async def main() -> None:
        async with aio.Server("127.0.0.1", 0, mode="echo") as server:
            async with aio.Client(*server.address, timeout=5) as client:
                assert await client.request("hello") == b"hello"
                for payload in ("text", b"bytes", bytearray(b"array"), memoryview(b"view")):
                    await client.send(payload)
                assert [await client.recv() for _ in range(4)] == [
                    b"text",
                    b"bytes",
                    b"array",
                    b"view",
                ]
                assert client.address == server.address
            assert client.closed

    run(main)


def test_async_for_over_the_server_with_awaited_replies(run: Runner) -> None:
    async def main() -> list[str]:
        seen: list[str] = []
        async with aio.Server("127.0.0.1", 0) as server:

            async def serve() -> None:
                async for event in server:
                    seen.append(type(event).__name__)
                    if isinstance(event, aio.Message):
                        # What a sync program checks holds here too: no silent mismatch.
                        assert isinstance(event, socketcomm.Message)
                        assert event.text == "question"
                        assert not event.raw
                        await event.reply(b"answer")

            serving = asyncio.create_task(serve())
            async with aio.Client(*server.address, timeout=5) as client:
                assert await client.request("question") == b"answer"
            await asyncio.sleep(0.1)
            await server.close()
            await serving
        return seen

    assert run(main) == ["Connected", "AsyncMessage", "Disconnected"]


def test_handlers_may_be_coroutines_and_failures_are_logged(
    run: Runner, caplog: pytest.LogCaptureFixture
) -> None:
    async def on_message(conn_id: int, data: bytes) -> bytes:
        if data == b"boom":
            raise RuntimeError("handler failure")
        await asyncio.sleep(0)
        return data.upper()

    async def main() -> None:
        async with aio.Server("127.0.0.1", 0, on_message=on_message) as server:
            async with aio.Client(*server.address, timeout=5) as client:
                assert await client.request("abc") == b"ABC"
                await client.send("boom")
                assert await client.request("still serving") == b"STILL SERVING"

    with caplog.at_level(logging.ERROR, logger="socketcomm.server"):
        run(main)
    assert any("on_message handler raised" in r.message for r in caplog.records)


def test_500_tasks_on_one_server_and_on_one_client(run: Runner) -> None:
    async def main() -> None:
        async with aio.Server("127.0.0.1", 0, mode="echo") as server:

            async def own_client(n: int) -> None:
                async with aio.Client(*server.address, timeout=30) as client:
                    for i in range(5):
                        assert await client.request(f"{n}:{i}") == f"{n}:{i}".encode()

            await asyncio.gather(*(own_client(n) for n in range(500)))

            async with aio.Client(*server.address, timeout=30) as shared:

                async def share(n: int) -> None:
                    for i in range(5):
                        assert await shared.request(f"{n}/{i}") == f"{n}/{i}".encode()

                await asyncio.gather(*(share(n) for n in range(500)))

    run(main)


def test_a_cancelled_recv_loses_no_message(run: Runner) -> None:
    async def main() -> None:
        async with aio.Server("127.0.0.1", 0) as server:
            async with aio.Client(*server.address, timeout=10) as client:
                connected = await server.recv(timeout=5)
                assert isinstance(connected, aio.Connected)

                async def push() -> None:
                    for n in range(2000):
                        await server.send(connected.conn_id, str(n))
                        if n % 50 == 0:
                            # Pauses long enough that some receives time out while waiting.
                            await asyncio.sleep(0.005)

                pushing = asyncio.create_task(push())
                received: list[bytes] = []
                cancellations = 0
                while len(received) < 2000:
                    try:
                        received.append(await asyncio.wait_for(client.recv(), 0.0005))
                    except TimeoutError:
                        cancellations += 1
                await pushing
                assert received == [str(n).encode() for n in range(2000)]
                assert cancellations > 0, "the test must actually cancel some receives"

    run(main)


def test_cancelling_a_task_waiting_in_recv(run: Runner) -> None:
    async def main() -> None:
        async with aio.Server("127.0.0.1", 0) as server:
            async with aio.Client(*server.address, timeout=10) as client:
                connected = await server.recv(timeout=5)
                assert isinstance(connected, aio.Connected)
                waiting = asyncio.create_task(client.recv())
                await asyncio.sleep(0.05)
                waiting.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await waiting
                await server.send(connected.conn_id, "after the cancel")
                assert await client.recv() == b"after the cancel"

    run(main)


def test_timeouts_raise_the_builtin_timeout_error(run: Runner) -> None:
    async def main() -> None:
        async with aio.Server("127.0.0.1", 0) as server:
            async with aio.Client(*server.address, timeout=0.1) as client:
                with pytest.raises(TimeoutError, match=r"no message within 0\.100 s"):
                    await client.recv()
                with pytest.raises(TimeoutError, match="no reply"):
                    await client.request("nobody answers in events mode")
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(client.recv(timeout=10), 0.05)
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.05):
                        await client.recv(timeout=10)
                assert await server.recv_many(timeout=0.05) != []  # Connected, Message

    run(main)


def test_cancelled_sends_write_whole_messages_or_nothing(run: Runner) -> None:
    async def main() -> None:
        # Nobody reads the events and the queue holds one, so the server stops reading and
        # the client's sends back up until they wait.
        async with aio.Server("127.0.0.1", 0, event_queue=1) as server:
            async with aio.Client(*server.address, timeout=10) as client:
                payload = b"m" * 60000
                sends = [asyncio.create_task(client.send(payload)) for _ in range(1500)]
                await asyncio.sleep(0.5)
                done = sum(task.done() for task in sends)
                assert done < len(sends), "some sends must be waiting"
                for task in sends:
                    task.cancel()
                await asyncio.gather(*sends, return_exceptions=True)
                completed = sum(not task.cancelled() for task in sends)
                messages: list[bytes] = []

                async def drain() -> None:
                    while True:
                        event = await server.recv(timeout=20)
                        if isinstance(event, aio.Message):
                            if event.data == b"last":
                                return
                            messages.append(event.data)

                draining = asyncio.create_task(drain())
                await client.send(b"last")
                await draining
                assert all(m == payload for m in messages), "every message arrived whole"
                assert completed <= len(messages) <= len(sends)

    run(main)


def test_errors_are_the_same_exceptions_as_the_sync_api(run: Runner) -> None:
    async def main() -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        with pytest.raises(ConnectionRefusedError):
            await aio.connect("127.0.0.1", port)
        async with aio.Server("127.0.0.1", 0, mode="echo", max_frame=1024) as server:
            async with aio.Client(*server.address, timeout=5) as client:
                with pytest.raises(socketcomm.FrameTooLargeError):
                    await client.send(b"x" * 5000)
                assert await client.request("still fine") == b"still fine"
            with pytest.raises(socketcomm.ConnectionClosedError):
                await client.recv()

    run(main)


def test_a_server_closed_while_clients_await(run: Runner) -> None:
    async def main() -> None:
        server = aio.Server("127.0.0.1", 0, mode="echo")
        clients = [await aio.connect(*server.address) for _ in range(20)]
        waiting = [asyncio.create_task(client.recv()) for client in clients]
        await asyncio.sleep(0.1)
        await server.close()
        results = await asyncio.gather(*waiting, return_exceptions=True)
        for result in results:
            assert isinstance(result, socketcomm.ConnectionClosedError)
            assert result.code == 1001
        iterated = [message async for message in clients[0]]
        assert iterated == [], "iteration ends quietly after a shutdown"
        for client in clients:
            await client.close()

    run(main)


def test_server_helpers(run: Runner) -> None:
    async def main() -> None:
        async with aio.Server("127.0.0.1", 0) as server:
            a = await aio.connect(*server.address, timeout=5)
            b = await aio.connect(*server.address, timeout=5)
            while len(server.connections) < 2:
                await asyncio.sleep(0.01)
            first, second = server.connections
            assert await server.broadcast("all") == 2
            assert await server.broadcast("not a", exclude=first) == 1
            await server.send(second, "only b")
            assert await a.recv() == b"all"
            assert [await b.recv() for _ in range(3)] == [b"all", b"not a", b"only b"]
            assert server.disconnect(first, "bye")
            with pytest.raises(socketcomm.ConnectionClosedError, match="bye"):
                await a.recv()
            with pytest.raises(ValueError, match="nothing would answer"):
                await server.serve_forever()
            await a.close()
            await b.close()

    run(main)


EXIT_SCRIPTS = {
    "asyncio, then exit": (
        "import asyncio, socketcomm.aio as aio\n"
        "async def main():\n"
        "    async with aio.Server('127.0.0.1', 0, mode='echo') as server:\n"
        "        async with aio.Client(*server.address) as client:\n"
        "            await asyncio.gather(*(client.request(b'x') for _ in range(20)))\n"
        "asyncio.run(main())\n"
    ),
    "a server with handlers never closed": (
        "import socketcomm\n"
        "server = socketcomm.Server('127.0.0.1', 0, on_message=lambda c, d: d)\n"
        "server.start()\n"
        "client = socketcomm.Client(*server.address, timeout=5)\n"
        "assert client.request(b'x') == b'x'\n"
    ),
}


@pytest.mark.parametrize("script", list(EXIT_SCRIPTS), ids=list(EXIT_SCRIPTS))
def test_the_interpreter_exits_cleanly(script: str) -> None:
    # Before threads of ours were kept off a finalizing interpreter, about one exit in twenty
    # after asyncio use aborted ("PyGILState_Release: thread state ... must be current").
    took = []
    for _ in range(40):
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-c", EXIT_SCRIPTS[script]],
            capture_output=True,
            text=True,
            timeout=30,
        )
        took.append(time.monotonic() - started)
        assert result.returncode == 0, result.stderr
        assert "Fatal Python error" not in result.stderr
    # Each run takes about a quarter of a second here; exit used to wait ~5 s after asyncio use.
    assert statistics.median(took) < 2, f"exits took {sorted(took)}"


def test_an_awaited_handler_holds_up_its_own_connection_only(run: Runner) -> None:
    handled: list[bytes] = []

    async def on_message(conn_id: int, data: bytes) -> bytes:
        if data == b"slow":
            await asyncio.sleep(1.0)
        handled.append(data)
        return data

    async def main() -> tuple[float, list[bytes]]:
        async with aio.Server("127.0.0.1", 0, on_message=on_message) as server:
            async with aio.Client(*server.address, timeout=10) as patient:
                async with aio.Client(*server.address, timeout=10) as other:
                    answered: list[bytes] = []

                    async def ask(data: bytes) -> None:
                        answered.append(await patient.request(data))

                    slow = asyncio.create_task(ask(b"slow"))
                    await asyncio.sleep(0.05)
                    after = asyncio.create_task(ask(b"after"))  # waits behind "slow"
                    await asyncio.sleep(0.05)
                    started = time.monotonic()
                    assert await other.request(b"meanwhile") == b"meanwhile"
                    took = time.monotonic() - started
                    await asyncio.gather(slow, after)
                    return took, answered

    handled.clear()
    took, answered = run(main)
    assert took < 0.5, f"another connection waited {took:.2f} s for a slow handler"
    assert sorted(answered) == [b"after", b"slow"]
    # One connection's messages are handled in order ("meanwhile" came on another).
    assert handled == [b"meanwhile", b"slow", b"after"]


def test_a_client_that_never_reads_its_answers_does_not_hold_up_the_others(run: Runner) -> None:
    def request(n: int) -> bytes:
        return struct.pack(">IBI", 5 + 100, 2, n) + b"r" * 100

    async def main() -> float:
        # slow_reader="wait": the greedy client is never dropped, so only the dispatch's
        # design keeps the others going (one task awaited its answers in turn before).
        async with aio.Server(
            "127.0.0.1",
            0,
            on_message=lambda c, d: d * 1000,
            outbound_queue=16,
            slow_reader="wait",
        ) as server:
            greedy = socket.socket()
            greedy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            greedy.connect(server.address)
            hello = b"\x89SCM\x01\x01\x00\x00" + struct.pack(">I", 1 << 20)
            greedy.sendall(hello + b"".join(request(n) for n in range(3000)))
            try:
                await asyncio.sleep(0.3)
                async with aio.Client(*server.address, timeout=10) as honest:
                    started = time.monotonic()
                    for _ in range(5):
                        assert await honest.request(b"x") == b"x" * 1000
                    return time.monotonic() - started
            finally:
                greedy.close()

    took = run(main)
    assert took < 3, f"the honest client waited {took:.1f} s"


def thread_cpu_seconds(name: str | None) -> float:
    """CPU time this process's threads named ``name`` have used (the main thread for None)."""
    ticks = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as stat:
                line = stat.read()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        comm = line[line.index("(") + 1 : line.rindex(")")]
        fields = line[line.rindex(")") + 2 :].split()
        # The kernel keeps the first 15 bytes of a thread's name.
        if (name is None and int(tid) == os.getpid()) or (name is not None and comm == name[:15]):
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def test_awaited_replies_wait_for_room_in_a_full_queue_and_keep_their_order(run: Runner) -> None:
    async def main() -> None:
        async with aio.Server("127.0.0.1", 0, outbound_queue=4, slow_reader="wait") as server:

            async def serve() -> None:
                async for event in server:
                    if isinstance(event, aio.Message):
                        await event.reply(event.data)  # waits while the queue is full

            serving = asyncio.create_task(serve())
            await asyncio.to_thread(echo_under_backpressure, server.address)
            await server.close()
            await serving

    run(main)


@pytest.mark.skipif(sys.platform != "linux", reason="the runtime's descriptor is found in /proc")
def test_the_loop_serves_the_connections_itself(run: Runner) -> None:
    """The loop watches the connections' runtime and serves them on its own thread when they
    have work: the server's caretaker thread, which serves them while the loop does not,
    stays idle under a steady load (it did three quarters of the work before)."""

    async def main() -> tuple[float, float]:
        async with aio.Server("127.0.0.1", 0) as server:
            poll_fd = server._core._poll_fd()
            assert poll_fd is not None
            assert os.readlink(f"/proc/self/fd/{poll_fd}") == "anon_inode:[eventpoll]"

            async def serve() -> None:
                async for event in server:
                    if isinstance(event, aio.Message):
                        await event.reply(event.data[::-1])

            serving = asyncio.create_task(serve())
            clients = [await aio.connect(*server.address, timeout=10) for _ in range(20)]
            loop_before = thread_cpu_seconds(None)
            caretaker_before = thread_cpu_seconds("socketcomm-serve")

            async def ask(client: aio.Client, n: int) -> None:
                for i in range(500):
                    question = f"{n}:{i}".encode()
                    assert await client.request(question) == question[::-1]

            await asyncio.gather(*(ask(client, n) for n, client in enumerate(clients)))
            loop_cpu = thread_cpu_seconds(None) - loop_before
            caretaker_cpu = thread_cpu_seconds("socketcomm-serve") - caretaker_before
            for client in clients:
                await client.close()
            await server.close()
            await serving
            return loop_cpu, caretaker_cpu

    loop_cpu, caretaker_cpu = run(main)
    assert loop_cpu >= 0.1, f"10,000 round trips took {loop_cpu:.2f} s of the loop's CPU"
    assert caretaker_cpu < 0.2 * loop_cpu, (
        f"the caretaker used {caretaker_cpu:.2f} s of CPU, the loop {loop_cpu:.2f} s"
    )


def test_connections_are_served_while_the_loop_is_busy(run: Runner) -> None:
    """While the loop runs blocking code, another thread serves the connections: a client is
    greeted (the server's hello, which its connect waits for); its message waits for the
    loop."""

    async def main() -> None:
        async with aio.Server("127.0.0.1", 0) as server:
            seen: list[bytes] = []

            async def serve() -> None:
                async for event in server:
                    if isinstance(event, aio.Message):
                        seen.append(event.data)
                        await event.reply(event.data)

            serving = asyncio.create_task(serve())
            await asyncio.sleep(0.05)
            greeted: list[float] = []
            answers: list[bytes] = []

            def connect_and_send() -> None:
                started = time.monotonic()
                with socketcomm.Client(*server.address, timeout=5) as client:
                    greeted.append(time.monotonic() - started)
                    answers.append(client.request(b"while busy"))

            thread = threading.Thread(target=connect_and_send)
            thread.start()
            time.sleep(0.5)  # the loop is blocked: nothing of asyncio runs
            assert greeted and greeted[0] < 0.4, f"greeted after {greeted}"
            assert seen == []
            assert answers == []
            await asyncio.get_running_loop().run_in_executor(None, thread.join, 5)
            assert seen == [b"while busy"]
            assert answers == [b"while busy"]
            await server.close()
            await serving

    run(main)


ECHO_SERVER = """
import socketcomm
server = socketcomm.Server("127.0.0.1", 0, mode="echo")
print(server.address[1], flush=True)
server.serve_forever()
"""

THREADS = (None, "socketcomm-io", "socketcomm-serve")


@pytest.mark.skipif(sys.platform != "linux", reason="the runtime's descriptor is found in /proc")
def test_the_loop_serves_its_clients_connections_itself(run: Runner) -> None:
    """A client's requests are written, and their replies read, on the loop's own thread:
    the shared runtime's threads (which did it before) and the loop runtime's caretaker stay
    idle while 20 clients make 10,000 round trips to a server in another process."""

    async def main(port: int) -> list[float]:
        clients = [await aio.connect("127.0.0.1", port, timeout=10) for _ in range(20)]
        before = [thread_cpu_seconds(name) for name in THREADS]

        async def ask(client: aio.Client, n: int) -> None:
            for i in range(500):
                question = f"{n}:{i}".encode()
                assert await client.request(question) == question

        await asyncio.gather(*(ask(client, n) for n, client in enumerate(clients)))
        after = [thread_cpu_seconds(name) for name in THREADS]
        for client in clients:
            await client.close()
        return [a - b for a, b in zip(after, before, strict=True)]

    with subprocess.Popen(
        [sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True
    ) as server:
        try:
            assert server.stdout is not None
            port = int(server.stdout.readline())
            loop_cpu, io_cpu, caretaker_cpu = run(lambda: main(port))
        finally:
            server.terminate()
    assert loop_cpu >= 0.1, f"10,000 round trips took {loop_cpu:.2f} s of the loop's CPU"
    others = io_cpu + caretaker_cpu
    assert others < 0.2 * loop_cpu, (
        f"other threads used {others:.2f} s of CPU (runtime {io_cpu:.2f} s, caretaker "
        f"{caretaker_cpu:.2f} s), the loop {loop_cpu:.2f} s"
    )


def test_an_idle_loop_serving_a_server_and_a_client_uses_no_cpu(run: Runner) -> None:
    """The loop serves the runtimes only when they have work: while nothing happens, an
    `aio.Server` with a connected `aio.Client` on the same loop costs next to no CPU (a turn
    that re-armed itself would keep one core busy)."""

    async def main() -> float:
        async with aio.Server("127.0.0.1", 0) as server:

            async def serve() -> None:
                async for event in server:
                    if isinstance(event, aio.Message):
                        await event.reply(event.data)

            serving = asyncio.create_task(serve())
            async with aio.Client(*server.address, timeout=5) as client:
                assert await client.request(b"x") == b"x"
                before = os.times()
                await asyncio.sleep(1.0)
                after = os.times()
            await server.close()
            await serving
        return (after.user - before.user) + (after.system - before.system)

    used = run(main)
    assert used < 0.3, f"an idle second cost {used:.2f} s of CPU"
