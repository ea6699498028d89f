"""The servers the benchmark measures, each started as `python benches/peers.py KIND`: it
prints `READY <port> <pid>` once listening and serves until SIGTERM.

All speak socketcomm's framed protocol (the 12-byte hello, then length-prefixed frames), so one
load generator drives them all. KIND is one of:

  socketcomm-echo        Server(mode="echo"): native, no Python per message
  socketcomm-handler     Server(on_message=handler): the dispatcher runs the Python handler
  socketcomm-pull        for event in server: event.reply(handler(...))
  socketcomm-recv-many   server.recv_many(): a batch of events, each answered with reply
  socketcomm-broadcast   Server(mode="broadcast"): relays topics natively; joined to other
                         servers through the Redis in $SOCKETCOMM_BENCH_BACKPLANE, if set
  protocol-echo          asyncio Protocol echo (add -uvloop for uvloop)
  protocol-echo-raw      asyncio Protocol, plain bytes: data_received writes the bytes back
                         (add -uvloop)
  protocol-handler       asyncio Protocol running the same Python handler (add -uvloop)
  protocol-handler-raw   asyncio Protocol, plain bytes: data_received writes back
                         handler(data), as a raw socketcomm server answers each chunk
                         (add -uvloop)
  streams-echo           asyncio streams echo (add -uvloop)
  streams-handler        asyncio streams running the same Python handler (add -uvloop)
  socketcomm-aio         socketcomm.aio on uvloop: async for event in server, await reply
  threaded-echo          socketserver.ThreadingTCPServer, one thread per connection
  cli-workers-N          `python -m socketcomm server --workers N` in reply mode (a Python
                         loop per process answers each message), to compare N processes
  socketcomm-tls-echo    Server(mode="echo", tls=ServerTls(cert, key)): native echo over TLS
  protocol-echo-ssl      asyncio Protocol echo over asyncio's ssl (add -uvloop)

The TLS peers read the certificate and key (PEM) from the folder in $SOCKETCOMM_BENCH_TLS.

"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import socketserver
import struct
import sys

from socketcomm._lifetime import stop_with_parent

HELLO = b"\x89SCM\x01\x01\x00\x00" + struct.pack(">I", 16 << 20)
DATA, REQUEST, REPLY = 1, 2, 3


def handler(conn_id: int, data: bytes) -> bytes:
    """The application code every handler row runs: an echo."""
    return data


def ready(port: int) -> None:
    print(f"READY {port} {os.getpid()}", flush=True)


def answer_frame(frame: bytes) -> bytes:
    """The reply to one whole frame, after running the handler on its payload."""
    kind = frame[4]
    if kind == REQUEST:
        body = handler(0, frame[9:])
        return struct.pack(">IBI", 5 + len(body), REPLY, int.from_bytes(frame[5:9], "big")) + body
    body = handler(0, frame[5:])
    return struct.pack(">IB", 1 + len(body), DATA) + body


class FramedProtocol(asyncio.Protocol):
    """Framed echo (or handler) as an asyncio Protocol: parse whole frames from a buffer."""

    run_handler = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have the same methods.
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = bytearray()
        self.greeted = False
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if not self.greeted:
            if len(buffer) < 12:
                return
            del buffer[:12]
            self.transport.write(HELLO)
            self.greeted = True
        out = []
        start = 0
        while len(buffer) - start >= 4:
            length = int.from_bytes(buffer[start : start + 4], "big")
            end = start + 4 + length
            if len(buffer) < end:
                break
            frame = bytes(buffer[start:end])
            out.append(answer_frame(frame) if self.run_handler else frame)
            start = end
        if start:
            del buffer[:start]
            self.transport.write(b"".join(out))


class HandlerProtocol(FramedProtocol):
    run_handler = True


class RawHandlerProtocol(asyncio.Protocol):
    """Plain bytes: each chunk that arrives goes through the handler and back."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.transport.write(handler(0, data))


class RawEchoProtocol(RawHandlerProtocol):
    """Plain bytes back as they come, with no handler call."""

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


def tls_files() -> tuple[str, str]:
    folder = os.environ["SOCKETCOMM_BENCH_TLS"]
    return os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")


async def serve_protocol(protocol: type[asyncio.Protocol], tls: bool = False) -> None:
    loop = asyncio.get_running_loop()
    context = None
    if tls:
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_cert_chain(*tls_files())
    server = await loop.create_server(protocol, "127.0.0.1", 0, backlog=1024, ssl=context)
    ready(server.sockets[0].getsockname()[1])
    await serve_until_term(server)


async def serve_streams(run_handler: bool) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await reader.readexactly(12)
            writer.write(HELLO)
            while True:
                header = await reader.readexactly(4)
                body = await reader.readexactly(int.from_bytes(header, "big"))
                frame = header + body
                writer.write(answer_frame(frame) if run_handler else frame)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0, backlog=1024)
    ready(server.sockets[0].getsockname()[1])
    await serve_until_term(server)


async def serve_until_term(server: asyncio.AbstractServer) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


class ThreadedEcho(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = sock.makefile("rb")
        if len(reader.read(12)) < 12:
            return
        sock.sendall(HELLO)
        while header := reader.read(4):
            body = reader.read(int.from_bytes(header, "big"))
            sock.sendall(header + body)


def serve_threaded() -> None:
    socketserver.ThreadingTCPServer.daemon_threads = True
    socketserver.ThreadingTCPServer.request_queue_size = 1024
    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), ThreadedEcho) as server:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        ready(server.server_address[1])
        server.serve_forever()


def serve_socketcomm(kind: str) -> None:
    import socketcomm

    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    if kind == "socketcomm-echo":
        server = socketcomm.Server("127.0.0.1", 0, mode="echo")
    elif kind == "socketcomm-tls-echo":
        tls = socketcomm.ServerTls(*tls_files())
        server = socketcomm.Server("127.0.0.1", 0, mode="echo", tls=tls)
    elif kind == "socketcomm-broadcast":
        # A native relay of topics; with SOCKETCOMM_BENCH_BACKPLANE, joined to the others.
        backplane = os.environ.get("SOCKETCOMM_BENCH_BACKPLANE")
        server = socketcomm.Server("127.0.0.1", 0, mode="broadcast", backplane=backplane)
    elif kind == "socketcomm-handler":
        server = socketcomm.Server("127.0.0.1", 0, on_message=handler)
    else:
        server = socketcomm.Server("127.0.0.1", 0)
    ready(server.address[1])
    try:
        # NOTE: the load generator may leave before its last answers, hence the `try`. Not
        # `contextlib.suppress`: entering and leaving it costs 0.39 µs per message here, a
        # quarter of what the pull loop spends per message at 8 x 100 B, and it would be the
        # benchmark's cost, not the library's (a `try` that raises nothing costs nothing),
        # whatever ruff's SIM105 prefers.
        if kind == "socketcomm-pull":
            for event in server:
                if isinstance(event, socketcomm.Message):
                    try:  # noqa: SIM105
                        event.reply(handler(event.conn_id, event.data))
                    except socketcomm.ConnectionClosedError:
                        pass
        elif kind == "socketcomm-recv-many":
            while True:
                for event in server.recv_many(256):
                    if isinstance(event, socketcomm.Message):
                        try:  # noqa: SIM105
                            event.reply(handler(event.conn_id, event.data))
                        except socketcomm.ConnectionClosedError:
                            pass
        else:
            server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close(timeout=1)


async def serve_socketcomm_aio() -> None:
    import socketcomm.aio

    async with socketcomm.aio.Server("127.0.0.1", 0) as server:
        ready(server.address[1])
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)

        async def serve() -> None:
            async for event in server:
                if isinstance(event, socketcomm.aio.Message):
                    try:  # noqa: SIM105 (not contextlib.suppress: see serve_socketcomm)
                        await event.reply(handler(event.conn_id, event.data))
                    except socketcomm.ConnectionClosedError:
                        pass

        serving = asyncio.create_task(serve())
        await stop.wait()
        serving.cancel()


def serve_cli_workers(workers: int) -> None:
    """Runs the command-line server with `workers` processes; reports every process's pid."""
    import subprocess
    import time

    reply = "x" * 1024  # the same size as the load generator's messages, which it expects back
    command = [sys.executable, "-m", "socketcomm", "server", "--port", "0", "-q"]
    command += ["--workers", str(workers), "--reply", reply, "--keep-open"]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    assert server.stderr is not None
    line = server.stderr.readline()
    port = int(line.split(":")[1].split()[0])
    pids = [server.pid]
    deadline = time.monotonic() + 10
    while len(pids) < workers and time.monotonic() < deadline:
        children = f"/proc/{server.pid}/task/{server.pid}/children"
        with open(children) as listing:
            pids = [server.pid, *map(int, listing.read().split())]
        time.sleep(0.05)
    time.sleep(0.5)  # the workers bind after they start
    print(f"READY {port} {','.join(map(str, pids))}", flush=True)
    signal.sigwait({signal.SIGTERM})
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=20)


def main() -> None:
    # A peer whose benchmark was killed stops too, rather than serving its port for ever.
    stop_with_parent(os.getppid())
    kind = sys.argv[1]
    if kind.startswith("cli-workers-"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        serve_cli_workers(int(kind.rsplit("-", 1)[1]))
        return
    if kind == "socketcomm-aio":
        import uvloop

        uvloop.run(serve_socketcomm_aio())
        return
    if kind.startswith("socketcomm-"):
        serve_socketcomm(kind)
        return
    if kind == "threaded-echo":
        serve_threaded()
        return
    base = kind.removesuffix("-uvloop")
    if kind.endswith("-uvloop"):
        import uvloop

        uvloop.install()
    if base == "protocol-echo":
        asyncio.run(serve_protocol(FramedProtocol))
    elif base == "protocol-echo-ssl":
        asyncio.run(serve_protocol(FramedProtocol, tls=True))
    elif base == "protocol-handler":
        asyncio.run(serve_protocol(HandlerProtocol))
    elif base == "protocol-handler-raw":
        asyncio.run(serve_protocol(RawHandlerProtocol))
    elif base == "protocol-echo-raw":
        asyncio.run(serve_protocol(RawEchoProtocol))
    elif base == "streams-echo":
        asyncio.run(serve_streams(run_handler=False))
    elif base == "streams-handler":
        asyncio.run(serve_streams(run_handler=True))
    else:
        raise SystemExit(f"unknown peer {kind!r}; see --help")


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if len(sys.argv) == 2 else 2)
    main()
