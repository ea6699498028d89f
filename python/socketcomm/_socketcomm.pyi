"""The native core of socketcomm (Rust, tokio), exposed through PyO3.

Every blocking call below releases the GIL while it waits and wakes at least every 100 ms to let
signal handlers run, so Ctrl-C raises ``KeyboardInterrupt`` promptly. Network I/O happens in
Rust (tokio): for the native modes and clients on a process-wide pool of threads, and for an
event-mode server on a runtime of its own that the Python thread waiting for its events drives
(a handler thread, the pull loop's thread), so that a message is read, handled and answered on
one thread. Python runs only on those Python threads, never inside a runtime.
"""

import os
from collections.abc import Awaitable, Callable, Generator, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, TypeAlias, final

from typing_extensions import Buffer, disjoint_base

__all__ = [
    "ACK_REPLY",
    "DEFAULT_HOST",
    "DEFAULT_INBOUND_BYTES",
    "DEFAULT_MAX_FILE_SIZE",
    "DEFAULT_MAX_FRAME",
    "DEFAULT_OUTBOUND_BYTES",
    "DEFAULT_PORT",
    "PROTOCOL_VERSION",
    "AbortOnCancel",
    "AsyncMessage",
    "Client",
    "ClientTls",
    "Connected",
    "ConnectionClosedError",
    "Disconnected",
    "FileReceived",
    "FileSent",
    "Flush",
    "FrameTooLargeError",
    "LoopRuntime",
    "Message",
    "PeerIdentity",
    "ProtocolError",
    "Ready",
    "Received",
    "Server",
    "ServerTls",
    "SocketCommError",
    "SubscriptionRequest",
    "TlsError",
    "TransferError",
    "TransferProgress",
    "__version__",
    "_connect",
    "_deliver",
    "default_max_buffered",
]

__version__: Final[str]
DEFAULT_HOST: Final[str]
"""Where servers listen and clients connect unless told otherwise: loopback."""
DEFAULT_PORT: Final[int]
"""The command line's default port (unprivileged, so no root is needed)."""
DEFAULT_MAX_FRAME: Final[int]
"""The default bound on one frame, 16 MiB."""
PROTOCOL_VERSION: Final[int]
DEFAULT_MAX_FILE_SIZE: Final[int]
"""The default bound on a received file, 16 GiB."""
DEFAULT_INBOUND_BYTES: Final[int]
"""The default ``inbound_bytes`` of a server connection and of a client, 4 MiB."""
DEFAULT_OUTBOUND_BYTES: Final[int]
"""The default ``outbound_bytes`` of a connection, 4 MiB."""

def default_max_buffered() -> int:
    """The bytes a server holds for its clients at most when ``max_buffered`` is None: a
    quarter of the memory this process may use (the machine's, or its control group's
    limit), at least 64 MiB."""

ACK_REPLY: Final[bytes]
"""The original server's reply, ``b"Your message has been received, Thank you!"``."""

_Data: TypeAlias = str | Buffer
"""A message payload: ``str`` is sent as UTF-8, any bytes-like object as is."""
_Dumps: TypeAlias = Callable[[Any], str | bytes]
"""Encodes one JSON document (``json.dumps``, ``orjson.dumps``)."""
_Loads: TypeAlias = Callable[[bytes], Any]
"""Decodes one JSON document (``json.loads``, ``orjson.loads``)."""

class SocketCommError(Exception):
    """The root of every socketcomm exception.

    OS failures are not wrapped: they stay the built-in ``OSError`` subclasses
    (``ConnectionRefusedError``, ``TimeoutError``, ``PermissionError``, ...).
    """

class ConnectionClosedError(SocketCommError, ConnectionError):
    """The connection has ended (the peer closed it, it was reset, or it was closed here)."""

    code: int | None
    """The close code when the ending side sent one (1000 normal, 1001 server shutting down,
    1002 protocol error, 1003 unsupported version, 1004 frame too large, 1005 server full,
    1006 idle timeout, 1007 too slow a reader, 1009 nothing arrived after a ping: the peer is
    unreachable, 1010 the server is busy: too much data in flight); docs/protocol.md lists
    them."""
    reason: str
    """Why the connection ended, in words."""

class ProtocolError(SocketCommError):
    """The peer does not speak the socketcomm protocol, or broke it."""

    code: int | None
    reason: str

class FrameTooLargeError(ProtocolError, ValueError):
    """A message is larger than the receiving side's ``max_frame``.

    Raised by ``send`` before anything is written when the peer announced a smaller limit, and
    by ``recv`` when the peer sent (or announced) a frame over this side's limit.
    """

class TlsError(SocketCommError, ConnectionError):
    """A TLS handshake or certificate check failed (the message names the check: unknown
    issuer, not valid for the name, expired, fingerprint mismatch, a client certificate
    required, plaintext against TLS or the other way round), or TLS settings are unusable."""

@final
class ServerTls:
    """A server's TLS settings: a certificate chain and key from PEM files.

    TLS 1.3 only by default; ``min_version="1.2"`` allows TLS 1.2 too. With ``client_ca`` (a
    PEM file of CA certificates) clients must present a certificate that one of them signed
    (mutual TLS); events then carry its ``peer_identity``. Files are read here: a missing one
    raises ``FileNotFoundError`` naming it, unusable contents ``TlsError``.
    """

    def __new__(
        cls,
        cert: str | os.PathLike[str],
        key: str | os.PathLike[str],
        *,
        client_ca: str | os.PathLike[str] | None = None,
        min_version: str = "1.3",
    ) -> Self: ...
    @staticmethod
    def self_signed(
        names: list[str] = ...,
        *,
        client_ca: str | os.PathLike[str] | None = None,
        min_version: str = "1.3",
    ) -> ServerTls:
        """A certificate made in memory for ``names`` (default: localhost, 127.0.0.1, ::1),
        for development: clients trust it by pinning its ``fingerprint``."""
    @property
    def fingerprint(self) -> str:
        """The SHA-256 fingerprint of the certificate, ``sha256:`` and 64 hex digits."""
    @property
    def mutual(self) -> bool:
        """Whether clients must present a certificate."""

@final
class ClientTls:
    """A client's TLS settings.

    The server's certificate is trusted when ``ca`` (a PEM file) signed it, or, without ``ca``,
    when one of the system's trusted roots did; with ``fingerprint`` (``sha256:...``, as
    `ServerTls.fingerprint` or ``openssl x509 -fingerprint -sha256`` print it) exactly that
    certificate is trusted, whoever signed it and whatever its names. The certificate must be
    valid for the host connected to, or for ``server_name``. ``cert`` and ``key`` (PEM) are the
    client's own certificate for servers that require one. TLS 1.3 only by default.
    """

    def __new__(
        cls,
        *,
        ca: str | os.PathLike[str] | None = None,
        fingerprint: str | None = None,
        cert: str | os.PathLike[str] | None = None,
        key: str | os.PathLike[str] | None = None,
        server_name: str | None = None,
        min_version: str = "1.3",
    ) -> Self: ...

@final
class PeerIdentity:
    """Who a client is, from the certificate it presented to a mutual-TLS server."""

    @property
    def subject(self) -> str:
        """The certificate's subject, as ``CN=alice, O=Example``."""
    @property
    def names(self) -> list[str]:
        """Its subject alternative names (DNS names, IP addresses, e-mail addresses, URIs)."""
    @property
    def fingerprint(self) -> str: ...

class TransferError(SocketCommError):
    """A file transfer was refused or failed its verification; nothing was saved.

    ``status`` names the kind: ``"refused"`` (the peer takes no files), ``"bad_name"``,
    ``"too_large"`` (over ``max_file_size``), ``"no_space"``, ``"digest_mismatch"``,
    ``"io_error"``, ``"bad_transfer"``, ``"going_away"`` (the peer is shutting down), ``"busy"``
    (too many transfers in progress: 4 from one sender, 64 into one folder; send it again once
    one has finished).
    """

    status: str

_Progress: TypeAlias = bool | Callable[[int, int], object] | None
"""``progress`` of ``send_file``: a callable ``(done, total)`` in bytes, ``True`` for a progress
bar on the terminal (stderr), or None."""

@final
class FileSent:
    """A file the peer received whole, verified and saved."""

    @property
    def name(self) -> str:
        """The name it was offered under."""
    @property
    def saved_as(self) -> str:
        """The name the receiver saved it under (numbered if the name was taken)."""
    @property
    def size(self) -> int: ...
    @property
    def digest(self) -> str:
        """The BLAKE3 digest both sides computed, in hexadecimal."""
    @property
    def resumed_from(self) -> int:
        """Bytes the receiver held from an interrupted attempt, which were not sent again."""
    @property
    def seconds(self) -> float: ...
    @property
    def rate(self) -> float:
        """Bytes per second sent by this call."""

@final
class SubscriptionRequest:
    """A client asks to subscribe to ``topic`` (a server with ``screen_subscriptions=True``):
    answer with `accept` or `refuse`; one dropped unanswered, or not answered within 10 s, is
    refused. The connection's later frames wait for the answer."""

    @property
    def conn_id(self) -> int: ...
    @property
    def peer(self) -> tuple[str, int]: ...
    @property
    def topic(self) -> str:
        """The topic name or pattern asked for."""
    @property
    def peer_identity(self) -> PeerIdentity | None:
        """The client's verified certificate, on a mutual-TLS server."""
    def accept(self) -> None:
        """Lets the client subscribe."""
    def refuse(self, reason: str = "refused by the server's application") -> None:
        """Refuses it: the client's ``subscribe`` raises ``PermissionError`` with ``reason``."""

@final
class Received:
    """A message a `Client` received, as ``recv_message()`` gives it."""

    @property
    def data(self) -> bytes:
        """The message as sent."""
    @property
    def topic(self) -> str | None:
        """The topic it was published to; None for a direct message (send, reply,
        broadcast)."""
    @property
    def text(self) -> str:
        """The message decoded as UTF-8; ``ValueError`` when it is not valid UTF-8."""
    def json(self, *, loads: _Loads | None = None) -> Any:
        """The message decoded from JSON; ``ValueError`` when it is not JSON."""

@final
class FileReceived:
    """A file that arrived whole and verified, and is now in its folder."""

    @property
    def conn_id(self) -> int:
        """The sending connection's id on a server; 0 for a file a `Client` received."""
    @property
    def peer(self) -> tuple[str, int]:
        """The sender's ``(host, port)``."""
    @property
    def name(self) -> str:
        """The name it was saved under: the offered name reduced to a base name, numbered
        (``name (1).ext``) if a file of that name existed, which is never replaced."""
    @property
    def offered_name(self) -> str:
        """The name the sender offered."""
    @property
    def path(self) -> Path: ...
    @property
    def size(self) -> int: ...
    @property
    def digest(self) -> str:
        """Its BLAKE3 digest, in hexadecimal, checked against the sender's."""
    @property
    def resumed_from(self) -> int:
        """Bytes kept from an earlier, interrupted transfer of the same file."""
    @property
    def peer_identity(self) -> PeerIdentity | None:
        """The sender's verified certificate, on a mutual-TLS server."""

@final
class TransferProgress:
    """How far an asyncio transfer has got (``socketcomm.aio`` reads it)."""

    @property
    def done(self) -> int: ...
    @property
    def total(self) -> int: ...

@final
class Connected:
    """A client connected."""

    @property
    def conn_id(self) -> int:
        """The connection's id, unique for the lifetime of the server."""
    @property
    def peer(self) -> tuple[str, int]:
        """The client's ``(host, port)``."""
    @property
    def peer_identity(self) -> PeerIdentity | None:
        """The client's verified certificate, on a mutual-TLS server."""

@disjoint_base
class Message:
    """A message from a client. ``socketcomm.aio`` yields its subclass `AsyncMessage`, so
    ``isinstance(event, Message)`` holds in both APIs."""

    @property
    def conn_id(self) -> int:
        """The connection's id, unique for the lifetime of the server."""
    @property
    def peer(self) -> tuple[str, int]:
        """The client's ``(host, port)``."""
    @property
    def data(self) -> bytes:
        """The message as sent (from a plain socket: the bytes one read returned)."""
    @property
    def text(self) -> str:
        """The message decoded as UTF-8; ``ValueError`` when it is not valid UTF-8."""
    @property
    def peer_identity(self) -> PeerIdentity | None:
        """The client's verified certificate, on a mutual-TLS server."""
    @property
    def request_id(self) -> int | None:
        """The correlation id when the client sent a request and waits for the reply."""
    @property
    def topic(self) -> str | None:
        """The topic the client published the message to (``Client.publish``); None for a
        direct message."""
    @property
    def raw(self) -> bool:
        """True when the client is a plain socket (no socketcomm framing): its messages are
        the bytes as they arrived, and nothing tells where one ends."""
    def json(self, *, loads: _Loads | None = None) -> Any:
        """The message decoded from JSON (``json.loads``, or the ``loads`` given, orjson's
        say); ``ValueError`` when it is not JSON."""
    def reply_json(self, obj: Any, *, dumps: _Dumps | None = None) -> None:
        """Answers with ``obj`` as JSON (``json.dumps``, or the ``dumps`` given)."""
    def reply(self, data: _Data) -> None:
        """Answers this message: the reply to a request, or a plain message otherwise.

        Blocks (GIL released) only while the connection's outbound queue is full (as
        ``Server.send``, within ``slow_reader``'s limit). Raises ``ConnectionClosedError`` when
        the client has gone, ``FrameTooLargeError`` when the client's ``max_frame`` is smaller.
        """

@final
class AsyncMessage(Message):
    """A message from a client, as ``socketcomm.aio`` yields it (``socketcomm.aio.Message``):
    a `Message` whose ``reply`` is awaited."""

    def reply_json(  # type: ignore[override]
        self, obj: Any, *, dumps: _Dumps | None = None
    ) -> Awaitable[None]:
        """Answers with ``obj`` as JSON; await the result."""
    def reply(self, data: _Data) -> Awaitable[None]:  # type: ignore[override]
        """Answers this message. The awaitable completes at once when the connection's queue
        has room, and after waiting for room otherwise."""

@final
class Ready:
    """An awaitable that is already complete (returned when an async call's work was done at
    once)."""

    def __await__(self) -> Generator[Any]: ...
    def __iter__(self) -> Self: ...
    def __next__(self) -> None: ...

@final
class AbortOnCancel:
    """The done-callback that drops a Rust task when its asyncio future is cancelled."""

    def __call__(self, future: Any, /) -> None: ...

@final
class Flush:
    """Queues the answers an `aio` server's messages were given during one turn of the loop
    (scheduled with ``call_soon`` by the first of them)."""

    def __call__(self, *args: Any) -> None: ...

@final
class LoopRuntime:
    """The runtime that the ``socketcomm.aio`` clients of one asyncio loop run on, served by
    that loop: it watches ``_poll_fd()`` and calls ``_turn()`` when it is readable."""

    def __init__(self) -> None: ...
    def _poll_fd(self) -> int | None:
        """The descriptor that is readable while the clients' connections have work (None
        where it cannot be found)."""
    def _turn(self) -> None:
        """Serves the connections for one turn on the calling thread; returns at once."""

def _deliver(future: Any, is_error: bool, value: Any) -> None:
    """Sets an asyncio future's outcome on its loop, unless it was cancelled meanwhile."""

def _connect(
    host: str,
    port: int,
    *,
    timeout: float | None = None,
    connect_timeout: float = 10.0,
    raw: bool = False,
    max_frame: int = ...,
    tls: ClientTls | None = None,
    retries: int = 0,
    backoff: float = 0.2,
    download_dir: str | os.PathLike[str] | None = None,
    max_file_size: int = ...,
    inbound_bytes: int = ...,
    local_address: tuple[str, int] | None = None,
    nodelay: bool = True,
    keepalive: float | None = None,
    keepalive_interval: float | None = None,
    keepalive_count: int | None = None,
    recv_buffer: int | None = None,
    send_buffer: int | None = None,
    linger: float | None = None,
    ping_interval: float | None = 20.0,
    ping_timeout: float | None = 20.0,
    loop_runtime: LoopRuntime | None = None,
) -> Awaitable[Client]:
    """Connects without blocking the event loop (``socketcomm.aio.Client`` uses it); the
    connection runs on ``loop_runtime`` when given, else on the shared runtime."""

@final
class Disconnected:
    """A connection ended."""

    @property
    def conn_id(self) -> int:
        """The connection's id, unique for the lifetime of the server."""
    @property
    def peer(self) -> tuple[str, int]:
        """The client's ``(host, port)``."""
    @property
    def reason(self) -> str:
        """Why it ended, in words ("closed by the client", "server shutting down", ...)."""
    @property
    def code(self) -> int | None:
        """The close code, when a close frame was exchanged."""
    @property
    def peer_identity(self) -> PeerIdentity | None:
        """The client's verified certificate, on a mutual-TLS server."""

_Event: TypeAlias = Connected | Message | FileReceived | Disconnected | SubscriptionRequest

@final
class Server:
    """A TCP server: framed socketcomm clients and plain sockets on the same port.

    Binds and starts serving on construction (``port=0`` picks a free port; ``address`` tells
    which); events wait in a bounded queue until read. ``start()`` runs ``on_*`` handlers in the
    background, ``serve_forever()`` blocks, ``close()`` (or leaving ``with``) stops.
    Each connection is told apart by its first bytes: a socketcomm hello selects the framed
    protocol, anything else raw mode (bytes as they come, as the original ``server.py`` spoke).

    Modes:
      * ``"events"`` (default): messages become events, read by iterating over the server or by
        ``recv()``, or handed to ``on_message``/``on_connect``/``on_disconnect`` callbacks.
      * ``"echo"``: every message is sent back, natively (no Python per message).
      * ``"ack"``: every message is answered with ``reply``, natively.
      * ``"broadcast"``: every message is relayed to every other client, natively (a chat room).

    Options: ``max_frame`` bounds a frame from a client (bytes). ``max_connections`` bounds the
    clients served at once: one more is accepted, told "server full" (close code 1005, or a
    line of text for a plain socket) and closed, so it fails at once instead of waiting in the
    backlog. ``max_connections_per_ip`` (None: no limit) bounds those from one IP address the
    same way, so that one host cannot take every slot. ``idle_timeout`` (seconds) closes a
    connection that completed no message for that long (code 1006): the bytes of an unfinished
    frame do not count, so a client that trickles a frame byte by byte (slowloris) is dropped
    too, and neither do pings. A raw client's messages are the bytes it sends, however few:
    with ``raw_min_rate`` (bytes per second; 0, the default, is off) they count only once they
    add up to ``raw_min_rate * idle_timeout`` bytes, so one that sends a byte now and then is
    dropped as idle too (off by default: a person typing into netcat sends less than any rate
    that stops a trickle).
    ``backplane="redis://host:6379/0"`` joins this server to the others using that Redis:
    every publish and broadcast is delivered here at once and through Redis pub/sub (one
    connection, reconnecting with backoff) to their connections too, so servers in several
    processes or machines behind a load balancer serve one set of rooms; each message is
    delivered once. While Redis is away the server serves its own rooms, and what the others
    would have got is dropped and counted (``stats()``). None (the default) serves alone.
    A client's ``subscribe(topic)`` puts its connection in that room (see `join`); with
    ``on_subscribe(conn_id, topic)`` the application decides: a true result lets it subscribe,
    a false one (or an exception, which is logged) refuses it, and the client's ``subscribe``
    raises ``PermissionError``. With ``screen_subscriptions=True`` (and no ``on_subscribe``)
    each request comes as a `SubscriptionRequest` event, to ``accept()`` or ``refuse()``
    (one dropped unanswered, or left 10 s, is refused). ``on_subscribe`` runs on the handler
    threads like the other handlers (in a native mode, where it is the only handler allowed, on
    a thread of its own), and that connection's later frames wait for its answer.
    ``hello_timeout`` (seconds, on by default) closes a connection that has not said what it
    speaks that long after it was accepted (after its TLS handshake, with TLS): one that sent
    nothing, or a framed client's unfinished hello (code 1006, counted in ``idle_timeouts``),
    so silent connections cannot hold every ``max_connections`` slot. None waits for ever.
    Heartbeats: every ``ping_interval`` seconds the server pings each framed client; one from
    which nothing at all has arrived for ``ping_timeout`` seconds after a ping (not the pong,
    no data, and on Linux no acknowledgement of what the server sends it) is closed with code
    1009, so a peer that vanished without a FIN (a cut cable, a NAT that forgot the flow) is
    noticed within ``ping_interval + ping_timeout``. ``latency(conn_id)`` is the last ping's
    round trip. None turns either off; raw clients are never pinged. ``event_queue`` and
    ``outbound_queue`` bound the events waiting for Python and the messages waiting to be
    written to one client, and ``outbound_bytes`` (4 MiB) the bytes of those messages (a larger
    message waits for an empty queue and has it to itself): when either is full the connection
    waits (backpressure, never unbounded memory). In bytes too: ``inbound_bytes`` (4 MiB) bounds
    one connection's messages that wait for the application (a handler that blocks holds back
    its own connection's reading, not only its events), and ``max_buffered`` (None: a quarter of
    the machine's memory, or of the control group's limit) what the server holds for all its
    clients together, with the frames still arriving beyond a connection's first 256 KiB; a
    connection whose share is spent stops reading its socket (TCP pushes back on its client)
    until the application takes what came, and loses nothing. A frame in progress that finds no
    room within 10 s ends its connection with code 1010 (server busy), so that large frames
    arriving at once cannot wait for each other's room for ever; the frame that has waited
    longest may wait 10 s more, and so gets the room the others give back. A send, a reply or a
    broadcast that finds a client's queue full waits for room; with ``slow_reader="disconnect"``
    (the default) it waits at most one second, then drops that client and what is queued for it
    (its ``Disconnected`` event has code 1007, and the send raises ``ConnectionClosedError``),
    so one client that never reads cannot hold a handler thread, a task or a broadcast for long
    (the slow readers of one broadcast share that one second); ``slow_reader="wait"`` waits for
    it however long it takes.
    ``backlog`` is the listen backlog. The ``on_*`` handlers run on ``handler_threads``
    dispatcher threads that take one connection at a time: a connection's events are handled
    in order, one after another, and a handler that blocks (on I/O, a lock, a sleep) holds up
    its own connection while the other threads serve the rest (the GIL still runs one handler's
    Python at a time). One thread does the work, reading, handling and answering on the same
    thread; the next joins in once every thread before it has been stuck in one handler for
    20 ms, so a blocked handler delays the other connections by about that much. A warning on
    the ``socketcomm`` logger names a handler and its connection once it has run for
    ``slow_handler`` seconds; when every thread is blocked, all events wait (bounded by
    ``event_queue``, ``inbound_bytes`` and ``max_buffered``).

    TLS: with ``tls=ServerTls(...)`` the server speaks TLS only. A plaintext client is told
    that TLS is required (a close frame with code 1008, or a line of text) and closed; a client
    that does not complete its handshake within ``tls_handshake_timeout`` seconds is dropped.
    A plaintext server closes a client that begins a TLS handshake, with a reason in the log.

    Files: with ``upload_dir`` set (receiving files is off without it), clients may send files
    with ``Client.send_file``. Each is written to a hidden folder inside ``upload_dir`` while it
    arrives, and linked into ``upload_dir`` under its (base) name only once its BLAKE3 digest
    matches the sender's; a file of that name is never replaced (the new one is saved as
    ``name (1).ext``). A ``FileReceived`` event (or the ``on_file(conn_id, file)`` handler)
    tells of each. A transfer that is cut off is kept out of sight and resumed when the same
    file is offered again by the same sender (the one holding its resume token), for
    ``partial_ttl`` seconds (a day by default; older ones are removed at start and now and
    then); such files hold at most ``max_partial_bytes`` in all (None: a quarter of the
    folder's file system), and give way, oldest first, beyond it and to a new upload that
    finds too little free space. Files over ``max_file_size`` bytes, or larger than the free
    space (with those partial files removed), are refused before a byte is written. A missing or
    unwritable ``upload_dir`` raises ``OSError`` here, naming the folder.

    Socket options (set on every accepted connection): ``nodelay`` (TCP_NODELAY, on),
    ``keepalive`` (seconds idle before TCP keepalive probes; None: off) with
    ``keepalive_interval`` (seconds) and ``keepalive_count``, ``recv_buffer``/``send_buffer``
    (SO_RCVBUF/SO_SNDBUF bytes; None: the kernel's autotuning), ``linger`` (SO_LINGER seconds;
    0 resets on close). ``reuse_addr`` (on) lets a restarted server bind at once;
    ``reuse_port`` lets several servers share one port, the kernel spreading connections.
    ``workers`` opens that many listeners on the port, each with its own accept loop (for
    several processes, run ``python server.py --workers N``).
    Binding ``"::"`` serves IPv6 and IPv4 clients (dual stack).

    Raises ``OSError`` (e.g. ``errno.EADDRINUSE``) when the address cannot be bound and
    ``ValueError`` for an invalid option.
    """

    def __new__(
        cls,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        mode: str = "events",
        reply: _Data | None = None,
        on_message: Callable[[int, bytes], _Data | None] | None = None,
        on_connect: Callable[[int, tuple[str, int]], object] | None = None,
        on_disconnect: Callable[[int, str], object] | None = None,
        on_file: Callable[[int, FileReceived], object] | None = None,
        on_subscribe: Callable[[int, str], object] | None = None,
        handler_threads: int = 4,
        slow_handler: float = 5.0,
        upload_dir: str | os.PathLike[str] | None = None,
        max_file_size: int = ...,
        partial_ttl: float = 86400.0,
        max_partial_bytes: int | None = None,
        tls: ServerTls | None = None,
        tls_handshake_timeout: float = 10.0,
        hello_timeout: float | None = 10.0,
        max_frame: int = ...,
        max_connections: int = 10000,
        max_connections_per_ip: int | None = None,
        idle_timeout: float | None = None,
        raw_min_rate: int = 0,
        slow_reader: str = "disconnect",
        backlog: int = 1024,
        nodelay: bool = True,
        keepalive: float | None = None,
        keepalive_interval: float | None = None,
        keepalive_count: int | None = None,
        recv_buffer: int | None = None,
        send_buffer: int | None = None,
        linger: float | None = None,
        reuse_addr: bool = True,
        reuse_port: bool = False,
        workers: int = 1,
        event_queue: int = 4096,
        outbound_queue: int = 1024,
        outbound_bytes: int = ...,
        inbound_bytes: int = ...,
        max_buffered: int | None = None,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        backplane: str | None = None,
        screen_subscriptions: bool = False,
    ) -> Self: ...
    @property
    def tls_fingerprint(self) -> str | None:
        """The SHA-256 fingerprint of the TLS certificate served; None without TLS."""
    def fileno(self) -> int:
        """The listening socket's descriptor, to inspect it (``os.dup`` it first; do not
        close it)."""
    @property
    def address(self) -> tuple[str, int]:
        """The ``(host, port)`` the server listens on."""
    @property
    def mode(self) -> str:
        """``"events"``, ``"echo"``, ``"ack"`` or ``"broadcast"``."""
    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
    def start(self) -> None:
        """Serves in the background and returns at once. Idempotent.

        With ``on_*`` handlers, a dispatcher thread calls them, taking the GIL once per batch
        of events. ``on_message(conn_id, data)`` may return the reply (str or bytes-like) or
        None; an exception in a handler is logged to the ``socketcomm.server`` logger and the
        server keeps serving.
        """
    def serve_forever(self) -> None:
        """Serves until ``close()`` (from another thread or a handler) or Ctrl-C.

        Blocks, GIL released. Needs a native mode, ``on_*`` handlers or an ``upload_dir`` (a
        file drop: files are received into it, messages are read and dropped); in
        ``"events"`` mode without any of them iterate over the server instead (``ValueError``
        otherwise).
        """
    def close(self, timeout: float = 5.0) -> None:
        """Stops accepting, closes every connection after what is queued for it (framed
        clients get a close frame saying the server is shutting down), waits up to
        ``timeout`` seconds for that, then drops what remains. Idempotent; blocks, GIL
        released."""
    def recv(self, timeout: float | None = None) -> _Event:
        """The next event, waiting up to ``timeout`` seconds (None: no limit).

        Blocks, GIL released. Raises ``TimeoutError`` when none arrives in time, and
        ``ConnectionClosedError`` once the server is closed and every event was read.
        """
    def recv_many(self, max: int = 256, timeout: float | None = None) -> list[_Event]:
        """Up to ``max`` events: waits up to ``timeout`` seconds for the first (None: no
        limit), then takes those already queued, without waiting again. An empty list when none
        arrived in time; ``ConnectionClosedError`` once the server is closed and drained.
        Blocks, GIL released."""
    @property
    def connections(self) -> dict[int, tuple[str, int]]:
        """The live connections, ``{conn_id: (host, port)}``, oldest first."""
    def stats(self) -> dict[str, int]:
        """Counters of what the server has done: ``connections`` (open now),
        ``connections_total``, ``messages_in``, ``messages_out``, ``bytes_in``, ``bytes_out``,
        ``refused_full``, ``protocol_errors``, ``idle_timeouts``, ``slow_readers``,
        ``connection_errors``, ``files_received``, ``files_sent``, ``transfers_failed``
        (refused or failed, either way; interrupted ones are not counted), ``tls_failures``
        (handshakes that failed or timed out, and plaintext clients of a TLS server),
        ``rooms`` (with members now), and the backplane's: ``backplane_connected`` (1 while
        its link to Redis is up), ``backplane_published`` (handed to Redis for the other
        servers), ``backplane_received`` (theirs, delivered here) and ``backplane_dropped``
        (what the others did not get while Redis was away)."""
    def broadcast(self, data: _Data, exclude: int | Iterable[int] | None = None) -> int:
        """Sends ``data`` to every connection but ``exclude`` (an id or ids); returns how many
        it reached. A client whose outbound queue is full is handled by ``slow_reader``."""
    def send_json(self, conn_id: int, obj: Any, *, dumps: _Dumps | None = None) -> None:
        """Sends ``obj`` as one JSON message (``json.dumps``, or the ``dumps`` given), as
        `send`."""
    def broadcast_json(
        self, obj: Any, exclude: int | Iterable[int] | None = None, *, dumps: _Dumps | None = None
    ) -> int:
        """Sends ``obj`` as JSON to every connection but ``exclude``, as `broadcast`."""
    def publish_json(
        self,
        room: str,
        obj: Any,
        exclude: int | Iterable[int] | None = None,
        *,
        dumps: _Dumps | None = None,
    ) -> int:
        """Publishes ``obj`` as JSON to ``room``, as `publish`."""
    def join(self, conn_id: int, room: str) -> bool:
        """Puts the connection ``conn_id`` in ``room``; False when it was in it already.

        A room is a name of dot-separated segments (``"lobby"``, ``"chat.lobby"``), at most
        255 bytes of UTF-8 with no whitespace or control characters; a pattern joins every
        room it matches: ``*`` stands for one segment (``"chat.*"``), ``>`` as the last
        segment for one or more (``"chat.>"``). A connection leaves its rooms when it ends.
        ``ValueError`` for a name that breaks the rules, ``ConnectionClosedError`` when there
        is no such connection (any more)."""
    def leave(self, conn_id: int, room: str) -> bool:
        """Takes the connection out of ``room`` (a name or pattern, as joined); False when
        it was not in it."""
    def rooms(self, conn_id: int) -> list[str]:
        """The rooms (names and patterns) the connection is in, sorted; empty once it has
        ended."""
    def members(self, room: str) -> list[int]:
        """The ids of the connections that a publish to ``room`` reaches (those in the room,
        or in a pattern that matches it), sorted. ``ValueError`` for a pattern."""
    def publish(self, room: str, data: _Data, exclude: int | Iterable[int] | None = None) -> int:
        """Sends ``data`` to every connection in ``room`` (or in a pattern that matches it)
        but ``exclude``, each once however many of its rooms match; returns how many it
        reached. As `broadcast` otherwise: a client whose queue is full is handled by
        ``slow_reader``. ``ValueError`` for a pattern: a message goes to one room."""
    def latency(self, conn_id: int) -> float | None:
        """The round trip of the last ping the server sent ``conn_id`` and the client
        answered, in seconds; None before the first answer (``ping_interval`` after it
        connected), with pings off, and for a raw client. ``ConnectionClosedError`` when
        there is no such connection."""
    def disconnect(self, conn_id: int, reason: str = "closed by the server") -> bool:
        """Closes a connection after what is queued for it, telling a framed client ``reason``
        (close code 1000). False when there is no such connection (any more)."""
    def __iter__(self) -> Self: ...
    def __next__(self) -> _Event:
        """The next event; iteration ends once the server is closed and drained. Blocks, GIL
        released; Ctrl-C raises ``KeyboardInterrupt`` within about 100 ms."""
    def send(self, conn_id: int, data: _Data) -> None:
        """Sends one message to a connection. Blocks (GIL released) only while its outbound
        queue is full, for at most a second with ``slow_reader="disconnect"`` (then the client
        is dropped). ``ConnectionClosedError`` when the connection has ended."""
    # The asyncio API's primitives (socketcomm.aio.Server uses them).
    def send_file(
        self,
        conn_id: int,
        path: str | os.PathLike[str],
        name: str | None = None,
        *,
        progress: _Progress = None,
        timeout: float | None = None,
    ) -> FileSent:
        """Sends the file at ``path`` to the connection ``conn_id`` (a `Client` with a
        ``download_dir``), as `Client.send_file` does. Blocks, GIL released."""
    def _send_file(
        self, conn_id: int, path: str | os.PathLike[str], name: str | None
    ) -> tuple[Awaitable[FileSent], TransferProgress]:
        """Sends a file to a connection; the awaitable gives the `FileSent`."""
    def _try_event(
        self,
    ) -> Connected | AsyncMessage | FileReceived | Disconnected | SubscriptionRequest | None:
        """The next event (asyncio flavour) if one is queued, else None."""
    def _wakeup_fd(self) -> int:
        """The descriptor that becomes readable once ``_arm`` was called and ``_try_event``
        has an event or the end to report."""
    def _arm(self) -> None:
        """The loop is about to wait for an event: wake it through ``_wakeup_fd``."""
    def _poll_fd(self) -> int | None:
        """The descriptor that is readable while the connections have work to do; the loop
        watches it and calls ``_turn`` then (None: wait through ``_wakeup_fd`` alone)."""
    def _has_event(self) -> bool:
        """Whether ``_try_event`` has an event or the end to report now."""
    def _turn(self) -> None:
        """Serves the connections for one turn on the calling thread; returns at once."""
    def _send(self, conn_id: int, data: _Data) -> Awaitable[None]:
        """Sends to one connection, waiting for room in its queue."""
    def _broadcast(self, data: _Data, exclude: int | Iterable[int] | None = None) -> Awaitable[int]:
        """Sends to every connection but ``exclude``; the awaitable gives how many."""
    def _publish(
        self, room: str, data: _Data, exclude: int | Iterable[int] | None = None
    ) -> Awaitable[int]:
        """Sends to every connection a publish to ``room`` reaches but ``exclude``."""
    def _close(self, timeout: float = 5.0) -> Awaitable[None]:
        """Closes as ``close()`` does, without blocking the event loop."""
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
        /,
    ) -> None: ...

@final
class Client:
    """A connection to a socketcomm server (or, with ``raw=True``, to any TCP server).

    Connects on construction within ``connect_timeout`` seconds. ``timeout`` is the default
    limit of ``recv()``, ``request()`` and of ``send()`` waiting for room (None: wait without
    limit). One client may be used
    from several threads at once: ``request()`` matches its reply by a correlation id, so
    concurrent requests and unsolicited messages read by ``recv()`` never get mixed up.
    Messages not yet read hold at most ``inbound_bytes`` (4 MiB; a larger one waits until
    nothing else does); beyond that the client stops reading its socket and TCP pushes back on
    the server, so nothing is lost.

    Raises ``ConnectionRefusedError`` (and the other ``OSError`` subclasses) when the server
    cannot be reached, ``TimeoutError`` after ``connect_timeout``, and ``ProtocolError`` when
    the server is not a socketcomm server (connect with ``raw=True`` to plain TCP servers).
    ``local_address`` binds the local end before connecting. The socket options are those of
    `Server`. With ``retries``, connecting tries again that many times when the server cannot be
    reached, waiting ``backoff`` seconds and twice as long after each failure (at most 5 s); and
    when the connection is lost later (the server restarted, say), the next call reconnects the
    same way and carries on, logging each attempt at WARNING on ``socketcomm``. What was queued
    but not yet written when the connection was lost is lost with it, and a request whose
    connection ended before its reply is sent once more (at least once, not exactly once).
    ``tls=ClientTls(...)`` connects with TLS (``TlsError`` when the handshake or
    the certificate check fails). ``download_dir`` lets the server send files
    (`Server.send_file`), received as a server's ``upload_dir`` receives them and read with
    ``recv_file()``; without it they are refused. ``max_file_size`` bounds them.
    Heartbeats as on the server: a ping every ``ping_interval`` seconds, and a server from which
    nothing has arrived for ``ping_timeout`` seconds after one ends the connection (code 1009;
    the next call raises ``ConnectionClosedError``, or reconnects with ``retries``).
    ``latency`` is the last ping's round trip.
    """

    def __new__(
        cls,
        host: str,
        port: int,
        *,
        timeout: float | None = None,
        connect_timeout: float = 10.0,
        raw: bool = False,
        max_frame: int = ...,
        tls: ClientTls | None = None,
        retries: int = 0,
        backoff: float = 0.2,
        download_dir: str | os.PathLike[str] | None = None,
        max_file_size: int = ...,
        inbound_bytes: int = ...,
        local_address: tuple[str, int] | None = None,
        nodelay: bool = True,
        keepalive: float | None = None,
        keepalive_interval: float | None = None,
        keepalive_count: int | None = None,
        recv_buffer: int | None = None,
        send_buffer: int | None = None,
        linger: float | None = None,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
    ) -> Self: ...
    def fileno(self) -> int:
        """The socket's descriptor, to inspect it (``os.dup`` it first; do not close it)."""
    @property
    def address(self) -> tuple[str, int]:
        """The server's ``(host, port)``."""
    @property
    def local_address(self) -> tuple[str, int]:
        """This end's ``(host, port)``."""
    @property
    def timeout(self) -> float | None:
        """The default limit of ``recv``, ``request`` and ``send`` waits, in seconds."""
    @property
    def latency(self) -> float | None:
        """The round trip of the last ping this client sent and the server answered, in
        seconds; None before the first answer (``ping_interval`` after connecting), with pings
        off, and in raw mode."""
    @property
    def raw(self) -> bool:
        """Whether this client speaks raw bytes (no hello, no framing)."""
    @property
    def encrypted(self) -> bool:
        """Whether the connection is encrypted with TLS."""
    @property
    def closed(self) -> bool:
        """Whether the connection has ended or ``close()`` was called."""
    def send(self, data: _Data, timeout: float | None = None) -> None:
        """Queues one message; it is written in the background, in order, and flushed by
        ``close()``. Blocks (GIL released) only while the outbound queue is full (the server
        is not reading), then raises ``TimeoutError`` after ``timeout`` seconds (default: the
        client's), having queued nothing.

        Raises ``FrameTooLargeError`` before sending anything when the server's ``max_frame``
        is smaller, and ``ConnectionClosedError`` once the connection has ended.
        """
    def recv(self, timeout: float | None = None) -> bytes:
        """The next message that is not a reply to a request. Blocks, GIL released.

        ``timeout`` (seconds) overrides the client's. Raises ``TimeoutError`` when nothing
        arrives in time (no message is lost), ``ConnectionClosedError`` once the connection
        has ended and every earlier message was read. In raw mode a message is whatever bytes
        arrived together.
        """
    def send_json(
        self, obj: Any, timeout: float | None = None, *, dumps: _Dumps | None = None
    ) -> None:
        """Sends ``obj`` as one JSON message, encoded with ``json.dumps`` or the ``dumps``
        given (``orjson.dumps``, say: ``str`` or ``bytes``). As `send` otherwise."""
    def recv_json(self, timeout: float | None = None, *, loads: _Loads | None = None) -> Any:
        """The next message decoded from JSON (``json.loads``, or the ``loads`` given);
        ``ValueError`` when it is not JSON (the message is taken all the same)."""
    def request_json(
        self,
        obj: Any,
        timeout: float | None = None,
        *,
        dumps: _Dumps | None = None,
        loads: _Loads | None = None,
    ) -> Any:
        """Sends ``obj`` as a JSON request and returns the reply decoded from JSON."""
    def publish_json(
        self, topic: str, obj: Any, timeout: float | None = None, *, dumps: _Dumps | None = None
    ) -> None:
        """Publishes ``obj`` as JSON to ``topic``, as `publish`."""
    def recv_message(self, timeout: float | None = None) -> Received:
        """As `recv`, the message with the topic it was published to (None for a direct
        message)."""
    def subscribe(self, topic: str, timeout: float | None = None) -> bool:
        """Subscribes to ``topic``: messages published to it arrive (``recv_message()``
        tells their topic). A topic is a room name of dot-separated segments
        (``"chat.lobby"``), or a pattern: ``*`` for one segment (``"chat.*"``), ``>`` as the
        last segment for one or more (``"chat.>"``). False when subscribed already. With
        ``retries``, a new connection subscribes again.

        ``ValueError`` for a name that breaks the rules, ``ProtocolError`` when the server
        speaks no topics (socketcomm before 0.2) or this client is raw, ``PermissionError``
        when the server's application refused it, ``TimeoutError`` when no answer came
        within ``timeout``."""
    def unsubscribe(self, topic: str, timeout: float | None = None) -> bool:
        """Unsubscribes from ``topic`` (as subscribed); False when it was not subscribed."""
    def publish(self, topic: str, data: _Data, timeout: float | None = None) -> None:
        """Publishes ``data`` to ``topic`` (a name, no wildcards) through the server: its
        application sees it as a `Message` whose ``topic`` is set, and a server in the
        ``broadcast`` mode relays it to every other client subscribed to a matching topic.
        Raises as `send` and `subscribe`."""
    def request(self, data: _Data, timeout: float | None = None) -> bytes:
        """Sends ``data`` as a request and returns the server's reply to it. Blocks, GIL
        released; raises as ``send()`` and ``recv()``. In raw mode there is no correlation id:
        the reply is the next bytes to arrive."""
    def send_file(
        self,
        path: str | os.PathLike[str],
        name: str | None = None,
        *,
        progress: _Progress = None,
        timeout: float | None = None,
    ) -> FileSent:
        """Sends the file at ``path`` under ``name`` (default: its own name) and returns once
        the server has checked its BLAKE3 digest and saved it. Blocks, GIL released.

        The file streams in chunks that share the connection with messages, in bounded memory
        whatever its size. If an earlier attempt was cut off, the server's copy of the part
        that arrived is checked and the transfer resumes after it (``resumed_from``).
        ``progress`` is a callable ``(done, total)`` called about every 100 ms, or ``True`` for
        a progress bar on stderr. ``timeout`` bounds the whole transfer (default: none); on
        ``TimeoutError`` or Ctrl-C the transfer stops and the next attempt resumes it.

        Raises ``TransferError`` when the server refuses the file (no ``upload_dir``, a bad
        name, too large, no space) or the digests differ, ``FileNotFoundError`` and other
        ``OSError`` subclasses when the file cannot be read, and ``ConnectionClosedError``
        when the connection ends first.
        """
    def recv_file(self, timeout: float | None = None) -> FileReceived:
        """The next file the server sent into ``download_dir``, verified and in place.
        Blocks, GIL released; raises ``TimeoutError`` after ``timeout`` (default: the
        client's) and ``ConnectionClosedError`` once the connection has ended."""
    def close(self) -> None:
        """Writes what was sent, tells the server goodbye and closes (waiting up to 5 s).
        Idempotent; later calls raise ``ConnectionClosedError``."""
    def __iter__(self) -> Self: ...
    def __next__(self) -> bytes:
        """The next message; iteration ends when the server closes the connection normally.
        Blocks without a time limit, GIL released."""
    # The asyncio API's primitives (socketcomm.aio.Client uses them).
    def _try_recv(self) -> bytes | None:
        """The next message if one is waiting, else None."""
    def _try_recv_message(self) -> Received | None:
        """As ``_try_recv``, the message with its topic."""
    def _subscription(self, topic: str, subscribe: bool) -> Awaitable[bool]:
        """Subscribes to (or unsubscribes from) ``topic``; the awaitable gives whether
        anything changed."""
    def _publish(self, topic: str, data: _Data) -> Awaitable[None]:
        """Publishes to ``topic``, waiting for room in the queue."""
    def _readable(self) -> Awaitable[None]:
        """Completes when ``_try_recv`` has a message or the end to report."""
    def _completions_fd(self) -> int:
        """The descriptor that becomes readable when this client's awaitables have outcomes
        to set; the loop watches it and calls ``_complete``."""
    def _complete(self) -> None:
        """Sets the outcomes handed over since the last call (on the loop's thread)."""
    def _timeout_error(self, what: str, seconds: float) -> TimeoutError:
        """The TimeoutError of a wait of ``seconds`` for ``what`` from the server."""
    def _try_send(self, data: _Data) -> bool:
        """Queues a message if there is room; False when the queue is full."""
    def _send(self, data: _Data) -> Awaitable[None]:
        """Queues a message, waiting for room."""
    def _request(self, data: _Data) -> Awaitable[bytes]:
        """Sends a request; the awaitable gives the reply."""
    def _send_file(
        self, path: str | os.PathLike[str], name: str | None
    ) -> tuple[Awaitable[FileSent], TransferProgress]:
        """Sends a file; the awaitable gives the `FileSent`."""
    def _recv_file(self) -> Awaitable[FileReceived]:
        """The next file received into ``download_dir``."""
    def _close(self) -> Awaitable[None]:
        """Flushes, says goodbye and closes, without blocking the event loop."""
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
        /,
    ) -> None: ...
