"""socketcomm for asyncio: the same names as the blocking API, awaitable.

    import socketcomm.aio

    async with socketcomm.aio.Server("127.0.0.1", 0) as server:
        async for event in server:
            if isinstance(event, socketcomm.aio.Message):
                await event.reply(b"got " + event.data)

    async with socketcomm.aio.Client("127.0.0.1", 5000, timeout=5) as client:
        await client.send(b"hi")
        print(await client.recv())

The network loop stays in Rust on the shared tokio runtime; each awaitable is a native future
bridged with pyo3-async-runtimes, so the event loop never blocks. Works on the standard loop and
on uvloop, with ``asyncio.timeout`` and ``asyncio.wait_for``.

Cancellation: a task cancelled while awaiting ``recv()`` (or the next event) gets
``CancelledError`` and takes no message: the next ``recv()`` returns it. A cancelled ``send()``
has queued the whole message or none of it. A cancelled ``request()`` may have sent the request;
its reply, if it comes, is discarded.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import json
import logging
import os
import weakref
from collections.abc import Awaitable, Callable, Iterable
from types import TracebackType
from typing import Any

from socketcomm import _progress, _socketcomm
from socketcomm._socketcomm import (
    AsyncMessage as Message,
)
from socketcomm._socketcomm import (
    Connected,
    ConnectionClosedError,
    Disconnected,
    FileReceived,
    FileSent,
    Received,
    SubscriptionRequest,
    TransferProgress,
)

__all__ = [
    "Client",
    "Connected",
    "Disconnected",
    "Event",
    "FileReceived",
    "FileSent",
    "Message",
    "Received",
    "Server",
    "SubscriptionRequest",
    "connect",
]

Event = Connected | Message | FileReceived | Disconnected | SubscriptionRequest
"""What iterating over an `aio.Server` yields (`SubscriptionRequest` only with
``screen_subscriptions=True``)."""

Data = str | bytes | bytearray | memoryview
PathLike = str | os.PathLike[str]
Progress = bool | Callable[[int, int], object] | None

# Iteration over a client ends quietly on these close codes (normal, server shutting down).
_QUIET_ENDINGS = (None, 1000, 1001)


Dumps = Callable[[Any], str | bytes]
Loads = Callable[[bytes], Any]


def _dumps(obj: Any, dumps: Dumps | None) -> str | bytes:
    """``obj`` as one JSON document, as the blocking API encodes it."""
    return (dumps or json.dumps)(obj)


def _loads(data: bytes, loads: Loads | None) -> Any:
    """The object the JSON message ``data`` holds; ValueError when it is not JSON."""
    try:
        return (loads or json.loads)(data)
    except ValueError as e:
        raise ValueError(f"the message is not JSON ({e}); its bytes are in .data") from e


def _answer(request: SubscriptionRequest, verdict: Any) -> None:
    if verdict:
        request.accept()
    else:
        request.refuse("the server's on_subscribe refused it")


async def _within(awaitable: Awaitable[Any], timeout: float | None, what: str) -> Any:
    """Awaits with a time limit, raising the built-in TimeoutError (as the sync API does)."""
    if timeout is None:
        return await awaitable
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except TimeoutError:
        raise TimeoutError(
            f"no {what} within {timeout:.3f} s; raise timeout= to wait longer"
        ) from None


async def _transfer(
    started: tuple[Awaitable[FileSent], TransferProgress],
    progress: Progress,
    name: str,
    timeout: float | None,
) -> FileSent:
    """Awaits a file transfer, reporting its progress about every 100 ms."""
    awaitable, watched = started
    reporter = _progress.reporter(progress, name)
    if reporter is None:
        sent: FileSent = await _within(awaitable, timeout, "end of the file transfer")
        return sent

    async def report() -> None:
        while True:
            reporter.update(watched.done, watched.total)
            await asyncio.sleep(0.1)

    reporting = asyncio.get_running_loop().create_task(report())
    try:
        sent = await _within(awaitable, timeout, "end of the file transfer")
    finally:
        reporting.cancel()
        reporter.update(watched.done, watched.total)
        reporter.close()
    return sent


def _shown_name(path: PathLike, name: str | None) -> str:
    return name if name is not None else os.path.basename(os.fspath(path))


async def _take(try_take: Callable[[], Any], ready: Callable[[], Awaitable[None]]) -> Any:
    """Takes the next item, waiting with ``ready()`` while there is none.

    Waiting and taking are separate steps so that a task cancelled while waiting has taken
    nothing: the item stays queued for the next call.
    """
    while True:
        item = try_take()
        if item is not None:
            return item
        await ready()


class _Watched:
    """A descriptor the running loop watches with ``add_reader`` (see src/python/wakeup.rs):
    the core writes a byte to it once per batch of events or outcomes, so they reach the loop
    with no thread hop and no task. Moves to another loop when used from one."""

    def __init__(self, fd: int, readable: Callable[[], object]) -> None:
        self._fd = fd
        self._readable = readable
        self._loop: asyncio.AbstractEventLoop | None = None

    def watch(self) -> asyncio.AbstractEventLoop:
        """Makes sure the running loop watches the descriptor; returns that loop."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self.stop()
            loop.add_reader(self._fd, self._readable)
            self._loop = loop
        return loop

    def stop(self) -> None:
        """Stops watching the descriptor (on close, or before moving to another loop)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
        self._loop = None


class _Wakeup(_Watched):
    """Waits for a server's next event on the running loop: the core writes to the descriptor
    once an event is there after ``_arm``."""

    def __init__(self, core: _socketcomm.Server) -> None:
        super().__init__(core._wakeup_fd(), self._woken)
        self._core = core
        self._waiters: list[asyncio.Future[None]] = []
        # NOTE: where the connections' runtime has a descriptor to watch, the loop serves
        # them itself whenever it is readable: a message is then read, handled and answered
        # on the loop's thread, with no other thread woken (see src/python/poll_fd.rs).
        poll_fd = core._poll_fd()
        self._serving = None if poll_fd is None else _Watched(poll_fd, self._serve)

    async def wait(self) -> None:
        if self._core.closed:
            # Closing: the last events are on their way, and the end follows once every
            # connection is done; look again shortly (the caller tries to take one first).
            await asyncio.sleep(0.01)
            return
        waiter = self.watch().create_future()
        if self._serving is not None:
            self._serving.watch()
        self._waiters.append(waiter)
        self._core._arm()
        try:
            await waiter
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _serve(self) -> None:
        self._core._turn()
        if self._waiters and self._core._has_event():
            self.release_waiters()

    def _woken(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._fd, 4096)
        self.release_waiters()

    def stop(self) -> None:
        """As `_Watched.stop`; the tasks waiting look again, so that none waits for a byte
        nobody will read."""
        super().stop()
        if self._serving is not None:
            self._serving.stop()
        self.release_waiters()

    def release_waiters(self) -> None:
        """Has every task waiting now look again."""
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


class _Completions(_Watched):
    """Runs the outcomes of a client's awaitables on the loop's own thread (``_complete``),
    instead of handing each to a thread that must win the GIL from the loop."""

    def __init__(self, core: _socketcomm.Client) -> None:
        super().__init__(core._completions_fd(), core._complete)
        self._core = core

    def watched(self) -> _socketcomm.Client:
        """The client, its outcomes watched by the running loop."""
        self.watch()
        return self._core


class _LoopServing(_Watched):
    """The runtime that the clients made on one loop run on, served by that loop whenever it
    has work (see src/python/loop_runtime.rs): a request is written and its reply read on the
    loop's own thread."""

    def __init__(self, runtime: _socketcomm.LoopRuntime, poll_fd: int) -> None:
        super().__init__(poll_fd, runtime._turn)
        self.runtime = runtime


# One per loop that has made clients; it goes with its loop.
_loop_servings: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopServing | None] = (
    weakref.WeakKeyDictionary()
)


def _loop_runtime() -> _socketcomm.LoopRuntime | None:
    """The runtime of the running loop's clients, watched by it; None where the loop cannot
    watch one (its clients then run on the shared runtime)."""
    loop = asyncio.get_running_loop()
    if loop not in _loop_servings:
        runtime = _socketcomm.LoopRuntime()
        poll_fd = runtime._poll_fd()
        _loop_servings[loop] = None if poll_fd is None else _LoopServing(runtime, poll_fd)
    serving = _loop_servings[loop]
    if serving is None:
        return None
    serving.watch()
    return serving.runtime


class Client:
    """A connection to a socketcomm server, for asyncio. Same options as `socketcomm.Client`
    (the socket options, ``local_address`` included, are passed as keywords).

    ``async with Client(host, port) as client`` connects on entry; ``await client.connect()``
    does the same without a ``with``. One client may be awaited by many tasks at once.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float | None = None,
        connect_timeout: float = 10.0,
        raw: bool = False,
        max_frame: int = _socketcomm.DEFAULT_MAX_FRAME,
        tls: _socketcomm.ClientTls | None = None,
        retries: int = 0,
        backoff: float = 0.2,
        download_dir: PathLike | None = None,
        max_file_size: int = _socketcomm.DEFAULT_MAX_FILE_SIZE,
        inbound_bytes: int = _socketcomm.DEFAULT_INBOUND_BYTES,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        **socket_options: Any,
    ) -> None:
        self._target = (host, port)
        self._options: dict[str, Any] = {
            "timeout": timeout,
            "connect_timeout": connect_timeout,
            "raw": raw,
            "max_frame": max_frame,
            "tls": tls,
            "retries": retries,
            "backoff": backoff,
            "download_dir": download_dir,
            "max_file_size": max_file_size,
            "inbound_bytes": inbound_bytes,
            "ping_interval": ping_interval,
            "ping_timeout": ping_timeout,
            **socket_options,
        }
        self._timeout = timeout
        self._core: _socketcomm.Client | None = None
        self._completions: _Completions | None = None

    async def connect(self) -> Client:
        """Connects (once); returns the client. Raises as `socketcomm.Client()` does."""
        if self._core is None:
            self._core = await _socketcomm._connect(
                *self._target, **self._options, loop_runtime=_loop_runtime()
            )
            self._completions = _Completions(self._core)
        return self

    @property
    def _connected(self) -> _socketcomm.Client:
        if self._core is None:
            raise ConnectionClosedError(
                "not connected: use `async with Client(...)` or `await client.connect()`"
            )
        return self._core

    @property
    def address(self) -> tuple[str, int]:
        return self._connected.address

    @property
    def local_address(self) -> tuple[str, int]:
        return self._connected.local_address

    @property
    def timeout(self) -> float | None:
        return self._timeout

    @property
    def latency(self) -> float | None:
        """The round trip of the last ping the server answered, in seconds (as
        `socketcomm.Client.latency`)."""
        return self._connected.latency

    @property
    def closed(self) -> bool:
        return self._core is not None and self._core.closed

    async def send(self, data: Data, timeout: float | None = None) -> None:
        """Queues one message; waits only while the outbound queue is full, for at most
        ``timeout`` seconds (default: the client's), then raises TimeoutError."""
        core = self._connected
        if not core._try_send(data):
            limit = timeout if timeout is not None else self._timeout
            await _within(core._send(data), limit, "room to send")

    async def recv(self, timeout: float | None = None) -> bytes:
        """The next message that is not a reply; ``timeout`` overrides the client's."""
        limit = timeout if timeout is not None else self._timeout
        result: bytes = await _within(self._next_message(), limit, "message")
        return result

    @property
    def _watched(self) -> _socketcomm.Client:
        """The connected client, its outcomes watched by the running loop."""
        self._connected  # noqa: B018 - raises when not connected
        assert self._completions is not None
        return self._completions.watched()

    async def _next_message(self) -> bytes:
        core = self._watched
        message: bytes = await _take(core._try_recv, core._readable)
        return message

    async def send_json(
        self, obj: Any, timeout: float | None = None, *, dumps: Dumps | None = None
    ) -> None:
        """Sends ``obj`` as a JSON message (``json.dumps``, or the ``dumps`` given)."""
        await self.send(_dumps(obj, dumps), timeout)

    async def recv_json(self, timeout: float | None = None, *, loads: Loads | None = None) -> Any:
        """The next message, decoded from JSON (``json.loads``, or the ``loads`` given)."""
        return _loads(await self.recv(timeout), loads)

    async def request_json(
        self,
        obj: Any,
        timeout: float | None = None,
        *,
        dumps: Dumps | None = None,
        loads: Loads | None = None,
    ) -> Any:
        """Sends ``obj`` as a JSON request and returns the reply decoded from JSON."""
        return _loads(await self.request(_dumps(obj, dumps), timeout), loads)

    async def publish_json(
        self, topic: str, obj: Any, timeout: float | None = None, *, dumps: Dumps | None = None
    ) -> None:
        """Publishes ``obj`` as JSON to ``topic``."""
        await self.publish(topic, _dumps(obj, dumps), timeout)

    async def recv_message(self, timeout: float | None = None) -> Received:
        """The next message that is not a reply, with the topic it was published to."""
        limit = timeout if timeout is not None else self._timeout
        core = self._watched
        result: Received = await _within(
            _take(core._try_recv_message, core._readable), limit, "message"
        )
        return result

    async def subscribe(self, topic: str, timeout: float | None = None) -> bool:
        """Subscribes to ``topic`` (a name or a pattern), as `socketcomm.Client.subscribe`."""
        limit = timeout if timeout is not None else self._timeout
        done: bool = await _within(
            self._watched._subscription(topic, True), limit, "answer to the subscription"
        )
        return done

    async def unsubscribe(self, topic: str, timeout: float | None = None) -> bool:
        """Unsubscribes from ``topic``; False when it was not subscribed."""
        limit = timeout if timeout is not None else self._timeout
        done: bool = await _within(
            self._watched._subscription(topic, False), limit, "answer to the subscription"
        )
        return done

    async def publish(self, topic: str, data: Data, timeout: float | None = None) -> None:
        """Publishes ``data`` to ``topic`` through the server; waits only while the queue
        is full."""
        limit = timeout if timeout is not None else self._timeout
        await _within(self._connected._publish(topic, data), limit, "room to send")

    async def request(self, data: Data, timeout: float | None = None) -> bytes:
        """Sends a request and returns the server's reply to it."""
        limit = timeout if timeout is not None else self._timeout
        try:
            reply: bytes = await _within(self._watched._request(data), limit, "reply")
        except TimeoutError:
            # The sync API's wording, which says why when this client stopped reading.
            raise self._watched._timeout_error("reply", limit or 0.0) from None
        return reply

    async def send_file(
        self,
        path: PathLike,
        name: str | None = None,
        *,
        progress: Progress = None,
        timeout: float | None = None,
    ) -> FileSent:
        """Sends a file as `socketcomm.Client.send_file` does (streamed, verified, resumed
        after an interruption); returns once the server has saved it. ``timeout`` bounds the
        whole transfer (default: none); cancelling stops it, and the next attempt resumes."""
        started = self._connected._send_file(path, name)
        return await _transfer(started, progress, _shown_name(path, name), timeout)

    async def recv_file(self, timeout: float | None = None) -> FileReceived:
        """The next file the server sent into ``download_dir``, verified and in place."""
        limit = timeout if timeout is not None else self._timeout
        received: FileReceived = await _within(self._connected._recv_file(), limit, "file")
        return received

    async def close(self) -> None:
        """Writes what was sent, tells the server goodbye and closes. Idempotent."""
        if self._core is not None:
            await self._core._close()
        if self._completions is not None:
            self._completions.stop()

    def __aiter__(self) -> Client:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._next_message()
        except ConnectionClosedError as e:
            if e.code in _QUIET_ENDINGS:
                raise StopAsyncIteration from None
            raise

    async def __aenter__(self) -> Client:
        return await self.connect()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        if self._core is None:
            host, port = self._target
            return f"<socketcomm.aio.Client {host}:{port} not connected>"
        return repr(self._core).replace("socketcomm.Client", "socketcomm.aio.Client")


async def connect(host: str, port: int, **options: Any) -> Client:
    """Connects and returns an `aio.Client` (options as `Client`)."""
    return await Client(host, port, **options).connect()


Handler = Callable[..., Any]


class Server:
    """A TCP server for asyncio. Same options as `socketcomm.Server`; binds and serves at once.

    ``on_message(conn_id, data)``, ``on_connect(conn_id, peer)``,
    ``on_disconnect(conn_id, reason)``, ``on_file(conn_id, file)`` and
    ``on_subscribe(conn_id, topic)`` (true lets the client subscribe, false refuses it) may be
    plain or ``async`` functions; they run on the
    event loop, one event at a time, in order, from ``serve_forever()`` (or the task ``start()``
    creates). ``on_message`` returns the reply (or None). Without handlers, iterate:
    ``async for event in server``.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        on_message: Handler | None = None,
        on_connect: Handler | None = None,
        on_disconnect: Handler | None = None,
        on_file: Handler | None = None,
        on_subscribe: Handler | None = None,
        **options: Any,
    ) -> None:
        self._handlers = (on_message, on_connect, on_disconnect, on_file)
        self._on_subscribe = on_subscribe
        if on_subscribe is not None:
            options["screen_subscriptions"] = True
        if any(self._handlers) and options.get("mode", "events") != "events":
            raise ValueError(
                f"invalid mode: the on_* handlers need mode='events', but mode="
                f"{options['mode']!r} answers natively"
            )
        self._core = _socketcomm.Server(host, port, **options)
        self._task: asyncio.Task[None] | None = None
        # Tasks finishing a connection's handlers that had to be awaited (see `_dispatch`).
        self._handling: set[asyncio.Future[None]] = set()
        self._wakeup = _Wakeup(self._core)

    @property
    def address(self) -> tuple[str, int]:
        return self._core.address

    @property
    def mode(self) -> str:
        return self._core.mode

    @property
    def closed(self) -> bool:
        return self._core.closed

    @property
    def connections(self) -> dict[int, tuple[str, int]]:
        return self._core.connections

    def stats(self) -> dict[str, int]:
        """Counters of what the server has done (as `socketcomm.Server.stats`)."""
        return self._core.stats()

    async def recv(self, timeout: float | None = None) -> Event:
        """The next event, waiting up to ``timeout`` seconds (None: no limit)."""
        event: Event = await _within(self._next_event(), timeout, "event")
        return event

    async def _next_event(self) -> Event:
        event: Event = await _take(self._core._try_event, self._wakeup.wait)
        return event

    async def recv_many(self, max: int = 256, timeout: float | None = None) -> list[Event]:
        """Up to ``max`` events: waits for the first, then takes those already queued. An empty
        list when none came within ``timeout``."""
        if not isinstance(max, int) or isinstance(max, bool):
            raise TypeError(f"invalid max: expected an integer, not {type(max).__name__}")
        if max < 1:
            raise ValueError("invalid max: must be at least 1")
        try:
            first = await self.recv(timeout)
        except TimeoutError:
            return []
        batch = [first]
        while len(batch) < max and (event := self._core._try_event()) is not None:
            batch.append(event)
        return batch

    async def send(self, conn_id: int, data: Data) -> None:
        """Sends one message to a connection, waiting only while its queue is full."""
        await self._core._send(conn_id, data)

    async def send_json(self, conn_id: int, obj: Any, *, dumps: Dumps | None = None) -> None:
        """Sends ``obj`` as a JSON message to one connection."""
        await self.send(conn_id, _dumps(obj, dumps))

    async def broadcast_json(
        self, obj: Any, exclude: int | Iterable[int] | None = None, *, dumps: Dumps | None = None
    ) -> int:
        """Sends ``obj`` as JSON to every connection but ``exclude``."""
        return await self.broadcast(_dumps(obj, dumps), exclude)

    async def publish_json(
        self,
        room: str,
        obj: Any,
        exclude: int | Iterable[int] | None = None,
        *,
        dumps: Dumps | None = None,
    ) -> int:
        """Publishes ``obj`` as JSON to ``room``."""
        return await self.publish(room, _dumps(obj, dumps), exclude)

    async def broadcast(self, data: Data, exclude: int | Iterable[int] | None = None) -> int:
        """Sends to every connection but ``exclude``; returns how many it reached."""
        reached: int = await self._core._broadcast(data, exclude)
        return reached

    def join(self, conn_id: int, room: str) -> bool:
        """Puts a connection in a room (a name or pattern), as `socketcomm.Server.join`."""
        return self._core.join(conn_id, room)

    def leave(self, conn_id: int, room: str) -> bool:
        """Takes a connection out of a room, as `socketcomm.Server.leave`."""
        return self._core.leave(conn_id, room)

    def rooms(self, conn_id: int) -> list[str]:
        """The rooms a connection is in, sorted."""
        return self._core.rooms(conn_id)

    def members(self, room: str) -> list[int]:
        """The ids of the connections a publish to ``room`` reaches, sorted."""
        return self._core.members(room)

    async def publish(
        self, room: str, data: Data, exclude: int | Iterable[int] | None = None
    ) -> int:
        """Sends to every connection in ``room`` (or a pattern matching it) but ``exclude``,
        each once; returns how many it reached. Waits only while full queues wait."""
        reached: int = await self._core._publish(room, data, exclude)
        return reached

    async def send_file(
        self,
        conn_id: int,
        path: PathLike,
        name: str | None = None,
        *,
        progress: Progress = None,
        timeout: float | None = None,
    ) -> FileSent:
        """Sends a file to a connection (a client with a ``download_dir``), as
        `socketcomm.Server.send_file` does."""
        started = self._core._send_file(conn_id, path, name)
        return await _transfer(started, progress, _shown_name(path, name), timeout)

    def disconnect(self, conn_id: int, reason: str = "closed by the server") -> bool:
        """Closes one connection after what is queued for it (does not block)."""
        return self._core.disconnect(conn_id, reason)

    def latency(self, conn_id: int) -> float | None:
        """The round trip of the last ping to ``conn_id`` that it answered, in seconds (as
        `socketcomm.Server.latency`)."""
        return self._core.latency(conn_id)

    @property
    def _handles_events(self) -> bool:
        return any(self._handlers) or self._on_subscribe is not None

    def start(self) -> None:
        """Runs the handlers in a task of the running event loop (idempotent)."""
        if self._handles_events and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._dispatch())

    async def serve_forever(self) -> None:
        """Serves until ``close()``: runs the handlers, or (native modes) just waits."""
        if self._task is not None:
            await self._task
        elif self._handles_events:
            await self._dispatch()
        elif self.mode != "events":
            async for _ in self:
                pass
        else:
            raise ValueError(
                "nothing would answer messages: pass on_message=..., choose mode='echo' or "
                "mode='ack', or iterate over the server instead (async for event in server)"
            )

    async def _dispatch(self) -> None:
        # NOTE: a connection whose handler (or answer) has to be awaited is handed to a task of
        # its own, which takes that connection's next events in order; the others go on here.
        # Awaiting it here instead let one slow coroutine, or one client that never reads its
        # answers, hold up every connection. An event handled at once costs no task.
        waiting: dict[int, collections.deque[Event]] = {}
        async for event in self:
            queued = waiting.get(event.conn_id)
            if queued is not None:
                queued.append(event)
                continue
            rest = self._handle(event)
            if rest is not None:
                waiting[event.conn_id] = collections.deque()
                task = asyncio.ensure_future(self._finish(event, rest, waiting))
                self._handling.add(task)
                task.add_done_callback(self._handling.discard)

    def _handle(self, event: Event) -> Awaitable[None] | None:
        """Runs the event's handler; what is left to await, if anything."""
        on_message, on_connect, on_disconnect, on_file = self._handlers
        if isinstance(event, SubscriptionRequest):
            return self._screen(event)
        try:
            if isinstance(event, Message):
                if on_message is None:
                    return None
                answer = on_message(event.conn_id, event.data)
                if inspect.isawaitable(answer):
                    return self._reply_later(event, answer)
                if answer is None:
                    return None
                replied = event.reply(answer)
                return None if isinstance(replied, _socketcomm.Ready) else replied
            args: tuple[Any, ...]
            if isinstance(event, Connected):
                handler, args = on_connect, (event.conn_id, event.peer)
            elif isinstance(event, FileReceived):
                handler, args = on_file, (event.conn_id, event)
            else:
                handler, args = on_disconnect, (event.conn_id, event.reason)
            result = None if handler is None else handler(*args)
            return result if inspect.isawaitable(result) else None
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except ConnectionClosedError:
            return None  # the client left before its answer
        except Exception:
            _log_handler_failure(event)
            return None

    def _screen(self, request: SubscriptionRequest) -> Awaitable[None] | None:
        """Answers a subscription with what ``on_subscribe`` says; what is left to await."""
        try:
            verdict = (
                True
                if self._on_subscribe is None
                else self._on_subscribe(request.conn_id, request.topic)
            )
        except Exception:
            _log_handler_failure(request)
            request.refuse("the server's on_subscribe failed")
            return None
        if inspect.isawaitable(verdict):
            return self._screen_later(request, verdict)
        _answer(request, verdict)
        return None

    @staticmethod
    async def _screen_later(request: SubscriptionRequest, verdict: Awaitable[Any]) -> None:
        try:
            _answer(request, await verdict)
        except Exception:
            _log_handler_failure(request)
            request.refuse("the server's on_subscribe failed")

    @staticmethod
    async def _reply_later(event: Message, answer: Awaitable[Any]) -> None:
        value = await answer
        if value is not None:
            await event.reply(value)

    async def _finish(
        self, event: Event, rest: Awaitable[None], waiting: dict[int, collections.deque[Event]]
    ) -> None:
        """Finishes `event`, then handles its connection's events that came meanwhile."""
        conn_id = event.conn_id
        try:
            while True:
                await _guarded(event, rest)
                queued = waiting[conn_id]
                while queued:
                    event = queued.popleft()
                    if (step := self._handle(event)) is not None:
                        rest = step
                        break
                else:
                    return
        finally:
            del waiting[conn_id]

    async def close(self, timeout: float = 5.0) -> None:
        """Stops accepting, closes every connection after what is queued, and returns."""
        await self._core._close(timeout)
        # Tasks that began to wait before the close look again now, and from then on poll
        # (see `_Wakeup.wait`) until the last events are taken: none waits for a byte that
        # may never come (the dispatch task once did, and close() with it).
        self._wakeup.release_waiters()
        if self._task is not None and self._task is not asyncio.current_task():
            await self._task
        # Handlers still awaited belong to connections that are gone by now.
        handling = [task for task in self._handling if task is not asyncio.current_task()]
        for task in handling:
            task.cancel()
        await asyncio.gather(*handling, return_exceptions=True)
        self._wakeup.stop()

    def __aiter__(self) -> Server:
        return self

    async def __anext__(self) -> Event:
        # NOTE: the loop of every asyncio server; the queued case costs one call and no
        # further coroutine (each level of them costs about a microsecond per event).
        try_event = self._core._try_event
        try:
            while (event := try_event()) is None:
                await self._wakeup.wait()
        except ConnectionClosedError:
            raise StopAsyncIteration from None
        return event

    async def __aenter__(self) -> Server:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return repr(self._core).replace("socketcomm.Server", "socketcomm.aio.Server")


async def _guarded(event: Event, rest: Awaitable[None]) -> None:
    """Awaits what is left of `event`'s handling, logging its failure as `_handle` does."""
    try:
        await rest
    except (asyncio.CancelledError, KeyboardInterrupt):
        raise
    except ConnectionClosedError:
        pass  # the client left before its answer
    except Exception:
        _log_handler_failure(event)


def _log_handler_failure(event: Event) -> None:
    logging.getLogger("socketcomm.server").exception(
        "%s handler raised; the server keeps serving", _handler_name(event)
    )


def _handler_name(event: Event | None) -> str:
    if isinstance(event, Message):
        return "on_message"
    if isinstance(event, FileReceived):
        return "on_file"
    if isinstance(event, SubscriptionRequest):
        return "on_subscribe"
    return "on_connect" if isinstance(event, Connected) else "on_disconnect"
