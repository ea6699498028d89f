"""The command line: ``socketcomm server|client``, ``python -m socketcomm``, and the drop-in
``server.py``/``client.py`` wrappers.

Every setting comes from a flag, else a ``SOCKETCOMM_<NAME>`` environment variable, else a TOML
file given with ``--config``, else its default (127.0.0.1 and an unprivileged port, so nothing
needs root); see `socketcomm.config`.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

from socketcomm import Event
from socketcomm._lifetime import accept_stop_signals, stop_with_parent
from socketcomm._socketcomm import (
    Client,
    ClientTls,
    Connected,
    ConnectionClosedError,
    Disconnected,
    FileReceived,
    Message,
    Server,
    ServerTls,
    SocketCommError,
    default_max_buffered,
)
from socketcomm.config import (
    CLIENT_SETTINGS,
    HEARTBEAT_NAMES,
    SERVER_SETTINGS,
    SOCKET_OPTION_NAMES,
    ConfigError,
    Resolved,
    add_arguments,
    resolve,
)

DEFAULT_MESSAGE = "Hello World"

log = logging.getLogger("socketcomm.cli")


def _add_verbosity(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log more: -v connections and disconnections with reasons, -vv everything",
    )


def _setup_logging(args: argparse.Namespace, settings: Resolved) -> None:
    if args.quiet:
        level = "error"
    elif args.verbose:
        level = "info" if args.verbose == 1 else "debug"
    else:
        level = settings["log_level"]
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _socket_options(settings: Resolved) -> dict[str, Any]:
    """The socket and heartbeat keywords of `Server` and `Client`, from the settings."""
    options = {name: settings[name] for name in SOCKET_OPTION_NAMES}
    # On the command line 0 turns a heartbeat setting off; the library says None.
    options.update({name: settings[name] or None for name in HEARTBEAT_NAMES})
    return options


def _memory_share(workers: int) -> int | None:
    """Each worker's part of the default `max_buffered`, so that the processes together hold
    no more than one server would (None for one process: the server's own default)."""
    if workers == 1:
        return None
    return max(default_max_buffered() // workers, 1)


def _server_tls(settings: Resolved) -> ServerTls | None:
    """The server's TLS from --tls-cert/--tls-key or --tls-self-signed; None for plaintext."""
    version = settings["tls_min_version"]
    if settings["tls_self_signed"]:
        if settings["tls_cert"] or settings["tls_key"]:
            raise ConfigError(
                "--tls-self-signed makes its own certificate: drop --tls-cert/--tls-key"
            )
        return ServerTls.self_signed(client_ca=settings["tls_client_ca"], min_version=version)
    if settings["tls_cert"] or settings["tls_key"]:
        if not (settings["tls_cert"] and settings["tls_key"]):
            raise ConfigError("TLS needs both --tls-cert and --tls-key")
        return ServerTls(
            settings["tls_cert"],
            settings["tls_key"],
            client_ca=settings["tls_client_ca"],
            min_version=version,
        )
    if settings["tls_client_ca"]:
        raise ConfigError("--tls-client-ca needs TLS: add --tls-cert and --tls-key")
    return None


def _client_tls(settings: Resolved) -> ClientTls | None:
    """The client's TLS from the --tls* flags; None for plaintext."""
    wanted = [
        settings[name]
        for name in ("tls", "tls_ca", "tls_fingerprint", "tls_client_cert", "tls_server_name")
    ]
    if not any(wanted):
        return None
    return ClientTls(
        ca=settings["tls_ca"],
        fingerprint=settings["tls_fingerprint"],
        cert=settings["tls_client_cert"],
        key=settings["tls_client_key"],
        server_name=settings["tls_server_name"],
        min_version=settings["tls_min_version"],
    )


SERVER_DESCRIPTION = """\
Serve socketcomm clients and plain TCP sockets on one port.

For every client it prints, as the original server.py did:
  connected to ('127.0.0.1', 45396)
  message from client is Hello World
  Communication with ('127.0.0.1', 45396) ended!

A socketcomm client is told apart from a plain socket by its first bytes, so the original
client.py (any plain socket that sends and reads) works unchanged. In the reply mode a plain
socket gets the original's exchange, one message, the reply, the close (--keep-open keeps it
connected instead, answering all it sends); socketcomm clients stay connected. Stop with Ctrl-C.
"""

SERVER_MODES = {
    "reply": "print each message and answer it with --reply (the original's behaviour)",
    "echo": "send every message back, natively in Rust (prints connects only)",
    "ack": "answer every message with --reply, natively in Rust (prints connects only)",
    "broadcast": "relay every message to every other client, natively: a chat room",
}


SERVER_EPILOG = "modes:\n" + "\n".join(f"  {k:<6} {v}" for k, v in SERVER_MODES.items())


def _add_server_arguments(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, SERVER_SETTINGS)
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="print nothing per client; log only errors"
    )
    _add_verbosity(parser)
    parser.set_defaults(run=run_server)


def _printable(data: bytes) -> str:
    text = data.decode("utf-8", errors="replace")
    if "\ufffd" in text and "\ufffd".encode() not in data:
        log.warning("the message was not valid UTF-8; undecodable bytes are shown as \ufffd")
    return text


def _raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _say(line: str) -> None:
    """Writes one line to standard error in one write: the processes of `--workers` share it,
    and a line written in pieces (print writes its text, then its newline) mixes with theirs."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def run_server(args: argparse.Namespace) -> int:
    settings = resolve(args, SERVER_SETTINGS, "server")
    if args.print_config:
        print(settings.render("server"))
        return 0
    _setup_logging(args, settings)
    native = settings["mode"] != "reply"
    # NOTE: the native modes serve --workers N as N listeners in this one process (the
    # kernel spreads connections over them, the Rust core uses every core), so a broadcast
    # reaches every client, whichever listener took it; worker processes would each keep a
    # room of their own. Only the reply mode, which runs Python per message, needs processes.
    listeners = settings["workers"] if native else 1
    workers = 1 if native else settings["workers"]
    if workers > 1 and settings["tls_self_signed"]:
        raise ConfigError(
            "--tls-self-signed makes a certificate per process, so clients could not pin one "
            "fingerprint; with --workers, use --tls-cert and --tls-key"
        )
    tls = _server_tls(settings)
    max_buffered = settings["max_buffered"] or _memory_share(workers)
    server = Server(
        settings["host"],
        settings["port"],
        mode=settings["mode"] if native else "events",
        reply=settings["reply"],
        max_frame=settings["max_frame"],
        inbound_bytes=settings["inbound_bytes"],
        outbound_bytes=settings["outbound_bytes"],
        max_buffered=max_buffered,
        max_connections=settings["max_connections"],
        idle_timeout=settings["idle_timeout"],
        raw_min_rate=settings["raw_min_rate"],
        upload_dir=settings["upload_dir"],
        max_file_size=settings["max_file_size"],
        max_partial_bytes=settings["max_partial_bytes"],
        tls=tls,
        reuse_addr=settings["reuse_addr"],
        reuse_port=settings["reuse_port"] or workers > 1,
        backlog=settings["backlog"],
        workers=listeners,
        backplane=settings["backplane"],
        **_socket_options(settings),
    )
    # SIGTERM stops the server the same way Ctrl-C does: gracefully, exit status 0.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    accept_stop_signals()
    if PARENT_ENV in os.environ:
        # A worker started by worker 0 stops when worker 0 is gone, however it went.
        stop_with_parent(int(os.environ[PARENT_ENV]))
    if workers > 1:
        os.environ[WORKER_ENV] = "0"  # this process is worker 0
    host, bound_port = server.address
    _say(
        f"listening on {host}:{bound_port} (mode {settings['mode']}"
        f"{_worker_tag(', ')}); Ctrl-C stops"
    )
    if listeners > 1:
        _say(f"{listeners} listeners in one process: one set of clients, one broadcast room")
    if settings["backplane"]:
        _say_backplane(server, settings["backplane"])
    elif workers > 1:
        _say(
            f"{workers} worker processes: each keeps its own rooms and subscriptions, so a "
            "topic published through one does not reach the subscribers of another; "
            "--backplane redis://... joins them"
        )
    if tls is not None:
        kind = "self-signed certificate" if settings["tls_self_signed"] else "certificate"
        mutual = "; clients must present a certificate" if tls.mutual else ""
        _say(f"serving TLS, {kind} {tls.fingerprint}{mutual}")
        if settings["tls_self_signed"]:
            _say(f"clients connect with: python client.py --tls-fingerprint {tls.fingerprint}")
    children = _start_workers(args, settings, bound_port, max_buffered) if workers > 1 else []
    printer = _EventPrinter(server, settings["reply"], settings["keep_open"], args.quiet)
    try:
        for event in server:
            printer.handle(event)
    except KeyboardInterrupt:
        _say("stopping: closing connections")
    finally:
        server.close()
        _stop_workers(children)
    # The connections closed by the shutdown are reported too.
    for event in server:
        printer.handle(event)
    stats = server.stats()
    files = f", {stats['files_received']} files received" if settings["upload_dir"] else ""
    _say(
        f"served {stats['connections_total']} connections, {stats['messages_in']} messages in "
        f"and {stats['messages_out']} out ({stats['bytes_in']} and {stats['bytes_out']} bytes)"
        f"{files}" + _worker_tag(" by ")
    )
    return 0


WORKER_ENV = "SOCKETCOMM_WORKER"


def _say_backplane(server: Server, url: str) -> None:
    """Says whether the backplane is up, waiting a moment for it (the server serves its own
    clients meanwhile, and whatever happens)."""
    deadline = time.monotonic() + 3
    while not server.stats()["backplane_connected"] and time.monotonic() < deadline:
        time.sleep(0.02)
    if server.stats()["backplane_connected"]:
        _say(f"backplane {url} connected: rooms and broadcasts are shared with its servers")
    else:
        _say(f"backplane {url} not reachable yet: serving this server's rooms alone meanwhile")


# The pid of worker 0, in the environment of the workers it starts.
PARENT_ENV = "SOCKETCOMM_WORKER_PARENT"


def _worker_tag(separator: str = " ") -> str:
    """`worker N` when this process is one of several workers, else nothing."""
    worker = os.environ.get(WORKER_ENV)
    return f"{separator}worker {worker}" if worker else ""


def _start_workers(
    args: argparse.Namespace, settings: Resolved, port: int, max_buffered: int | None
) -> list[subprocess.Popen[bytes]]:
    """Starts the other worker processes on the same port, each holding at most
    `max_buffered` like this one (worker 0)."""
    flags = settings.as_flags(SERVER_SETTINGS)
    flags += ["--port", str(port), "--workers", "1", "--reuse-port"]
    if settings["max_buffered"] is None:
        # Started as one worker each, they would each take the whole default.
        flags += ["--max-buffered", str(max_buffered)]
    flags += ["-q"] * bool(args.quiet) + ["-v"] * args.verbose
    children = []
    for worker in range(1, settings["workers"]):
        env = dict(os.environ, **{WORKER_ENV: str(worker), PARENT_ENV: str(os.getpid())})
        command = [sys.executable, "-m", "socketcomm", "server", *flags]
        children.append(subprocess.Popen(command, env=env))
    return children


def _stop_workers(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in children:
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


class _EventPrinter:
    """Prints each event as the original server did, and answers messages in reply mode.

    A plain-socket client gets the original's exchange: its first message is answered and the
    connection closed after the answer (unless ``keep_open``), so a client that reads to the end
    of the stream (``openssl s_client``, a ``recv`` loop) finishes as it did with the original.
    """

    def __init__(self, server: Server, reply: str, keep_open: bool, quiet: bool) -> None:
        self.server = server
        self.reply = reply
        self.keep_open = keep_open
        self.quiet = quiet
        # Plain-socket connections answered and being closed: what else they sent is ignored.
        self.closing: set[int] = set()

    def handle(self, event: Event) -> None:
        if isinstance(event, Message):
            self._message(event)
        elif isinstance(event, Disconnected):
            self.closing.discard(event.conn_id)
            if not self.quiet:
                # Logged before the line is printed, so that whoever sees the line (and stops
                # the server at once) finds the log record written too.
                log.info("connection %d ended: %s", event.conn_id, event.reason)
                print(f"Communication with {event.peer} ended!", flush=True)
        elif self.quiet:
            return
        elif isinstance(event, Connected):
            log.info("connection %d from %s", event.conn_id, event.peer)
            print(f"connected to {event.peer}{_worker_tag(' by ')}", flush=True)
        elif isinstance(event, FileReceived):
            print(
                f"received file {event.name!r} ({_size(event.size)}, blake3 {event.digest}) "
                f"from {event.peer} into {event.path}",
                flush=True,
            )

    def _message(self, message: Message) -> None:
        if message.conn_id in self.closing:
            return
        if not self.quiet:
            print(f"message from client is {_printable(message.data)}", flush=True)
        try:
            message.reply(self.reply)
        except SocketCommError as e:
            # The client left before the answer; the server goes on with the others.
            _say(f"could not answer {message.peer}: {e}")
            return
        if message.raw and not self.keep_open:
            self.closing.add(message.conn_id)
            self.server.disconnect(message.conn_id, "answered (the original's exchange)")


def _size(size: float) -> str:
    """A byte count for people: ``1.5 MiB``."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


CLIENT_DESCRIPTION = """\
Connect, send one message, print the answer and exit, as the original client.py did.

With -i (interactive), send each line typed instead and print messages as they arrive, until
/quit, the end of input (Ctrl-D) or Ctrl-C: a chat client for `server.py --mode broadcast`.
Rooms: --room ROOM joins one at start, and inside, /join ROOM joins another (lines then go
to it), /leave ROOM leaves one, /rooms lists them; a message from a room is shown as
[room] text.
Against a plain TCP server (such as the original server.py) add --raw.
"""

QUIT = "/quit"


def _add_client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "message",
        nargs="?",
        default=DEFAULT_MESSAGE,
        help="what to send (default: %(default)r)",
    )
    parser.add_argument(
        "-i",
        "--interactive",
        action="store_true",
        help=f"send each line typed, print what arrives, until {QUIT}",
    )
    parser.add_argument(
        "-f",
        "--file",
        action="append",
        metavar="PATH",
        help="send this file (repeat for more) with a progress bar, instead of a message; the "
        "server needs --upload-dir. Each is verified by its BLAKE3 digest, and one that was cut "
        "off resumes where it stopped",
    )
    add_arguments(parser, CLIENT_SETTINGS)
    parser.add_argument("-q", "--quiet", action="store_true", help="log only errors")
    _add_verbosity(parser)
    parser.set_defaults(run=run_client)


def run_client(args: argparse.Namespace) -> int:
    settings = resolve(args, CLIENT_SETTINGS, "client")
    if args.print_config:
        print(settings.render("client"))
        return 0
    _setup_logging(args, settings)
    raw = settings["raw"]
    try:
        with Client(
            settings["host"],
            settings["port"],
            timeout=settings["timeout"],
            connect_timeout=settings["timeout"],
            raw=raw,
            local_address=settings["local_address"],
            tls=_client_tls(settings),
            retries=settings["retries"],
            backoff=settings["backoff"],
            **_socket_options(settings),
        ) as client:
            if args.interactive:
                return _chat(client, settings["room"])
            if args.file:
                return _send_files(client, args.file, progress=not args.quiet)
            if raw:
                client.send(args.message)
                answer = client.recv()
            else:
                answer = client.request(args.message)
    except (OSError, SocketCommError) as e:
        _say(f"error: {e}")
        return 1
    print(answer.decode("utf-8", errors="replace"))
    return 0


def _send_files(client: Client, paths: list[str], progress: bool) -> int:
    """Sends each file, printing a line per file with its size, rate and digest."""
    for path in paths:
        sent = client.send_file(path, progress=progress)
        saved = f" (saved as {sent.saved_as!r})" if sent.saved_as != sent.name else ""
        resumed = f", resumed after {_size(sent.resumed_from)}" if sent.resumed_from else ""
        print(
            f"sent {sent.name!r}{saved}: {_size(sent.size)} in {sent.seconds:.2f} s "
            f"({_size(sent.rate)}/s{resumed}), blake3 {sent.digest}",
            flush=True,
        )
    return 0


_CLOSED = object()


class _Rooms:
    """The rooms an interactive client is in, and the one its lines go to (the last joined)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.joined: list[str] = []

    @property
    def current(self) -> str | None:
        return self.joined[-1] if self.joined else None

    def command(self, line: str) -> bool:
        """Carries out a /join, /leave or /rooms line; False for anything else."""
        verb, _, room = line.partition(" ")
        room = room.strip()
        if verb == "/rooms":
            shown = ", ".join(f"{r} (current)" if r == self.current else r for r in self.joined)
            _say(f"rooms: {shown}" if self.joined else "rooms: none; /join ROOM joins one")
            return True
        if verb not in ("/join", "/leave"):
            return False
        if not room:
            _say(f"usage: {verb} ROOM")
            return True
        try:
            if verb == "/join":
                self.join(room)
            else:
                self.leave(room)
        except (ValueError, PermissionError, SocketCommError) as e:
            _say(f"error: {e}")
        return True

    def join(self, room: str) -> None:
        self.client.subscribe(room)
        if room in self.joined:
            self.joined.remove(room)
        self.joined.append(room)
        _say(f"joined {room}; lines go to it")

    def leave(self, room: str) -> None:
        self.client.unsubscribe(room)
        if room in self.joined:
            self.joined.remove(room)
        where = f"lines go to {self.current}" if self.current else "lines go to everyone"
        _say(f"left {room}; {where}")

    def send(self, line: str) -> None:
        if self.current is None:
            self.client.send(line)
        else:
            self.client.publish(self.current, line)


def _chat(client: Client, room: str | None = None) -> int:
    """Sends each line of standard input and prints each message as it arrives."""
    host, port = client.address
    rooms = _Rooms(client)
    if room is not None:
        rooms.join(room)
    _say(f"connected to {host}:{port}; type messages, {QUIT} to leave")
    # Both stdin and the connection block, so each has a thread that feeds one queue, and the
    # main thread (the one Ctrl-C reaches) waits on that queue alone.
    inbox: queue.Queue[object] = queue.Queue()
    leaving = threading.Event()

    def read_lines() -> None:
        for line in sys.stdin:
            inbox.put(line.rstrip("\n"))
        inbox.put(None)

    def print_messages() -> None:
        try:
            while True:
                try:
                    message = client.recv_message()
                except TimeoutError:
                    continue
                shown = message.data.decode("utf-8", errors="replace")
                print(f"[{message.topic}] {shown}" if message.topic else shown, flush=True)
        except ConnectionClosedError as e:
            if not leaving.is_set():
                quiet = e.code in (None, 1000, 1001)
                _say("the server closed the connection" if quiet else f"connection lost: {e}")
        except SocketCommError as e:
            if not leaving.is_set():
                _say(f"connection lost: {e}")
        inbox.put(_CLOSED)

    threading.Thread(target=read_lines, daemon=True).start()
    threading.Thread(target=print_messages, daemon=True).start()
    while True:
        item = inbox.get()
        if item is _CLOSED:
            return 0
        if item is None or item == QUIT:
            leaving.set()
            return 0
        assert isinstance(item, str)
        if item and not rooms.command(item):
            rooms.send(item)


def _run(args: argparse.Namespace) -> int:
    try:
        result: int = args.run(args)
    except ConfigError as e:
        _say(f"error: {e}")
        return 2
    except (OSError, SocketCommError, ValueError) as e:
        _say(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        return 130
    return result


def _parser(description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def server_main(argv: Sequence[str] | None = None) -> int:
    """``server.py``: run a server (see ``--help``)."""
    parser = _parser(SERVER_DESCRIPTION, SERVER_EPILOG)
    _add_server_arguments(parser)
    return _run(parser.parse_args(argv))


def client_main(argv: Sequence[str] | None = None) -> int:
    """``client.py``: send one message and print the answer (see ``--help``)."""
    parser = _parser(CLIENT_DESCRIPTION)
    _add_client_arguments(parser)
    return _run(parser.parse_args(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """``socketcomm server|client ...`` and ``python -m socketcomm``."""
    parser = argparse.ArgumentParser(
        prog="socketcomm",
        description="Framed messages over TCP: run a server, or send a message as a client.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_server_arguments(
        commands.add_parser(
            "server",
            help="serve clients (socketcomm server --help tells more)",
            description=SERVER_DESCRIPTION,
            epilog=SERVER_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    _add_client_arguments(
        commands.add_parser(
            "client",
            help="send one message and print the answer (socketcomm client --help tells more)",
            description=CLIENT_DESCRIPTION,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    return _run(parser.parse_args(argv))
