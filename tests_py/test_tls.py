"""TLS through the Python API and the command line, with certificates made by the tests
(trustme: a CA, server and client certificates), and interoperability with Python's ``ssl``
module and the ``openssl s_client`` tool in both roles."""

from __future__ import annotations

import contextlib
import datetime
import os
import select
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

import socketcomm

from conftest import ServerProcess, recv_exactly, run

HELLO = b"\x89SCM\x01\x01\x00\x00\x01\x00\x00\x00"


@dataclass
class Pki:
    """A CA and the PEM files of certificates it issued, in a temporary folder."""

    ca: trustme.CA
    folder: Path

    @property
    def ca_file(self) -> Path:
        path = self.folder / "ca.pem"
        if not path.exists():
            self.ca.cert_pem.write_to_path(str(path))
        return path

    def issue(self, name: str, *identities: str, expired: bool = False) -> tuple[Path, Path]:
        """Writes a certificate (chain) and key for ``identities``; returns their paths."""
        dates = {}
        if expired:
            dates = {
                "not_before": datetime.datetime(2020, 1, 1),
                "not_after": datetime.datetime(2021, 1, 1),
            }
        leaf = self.ca.issue_cert(*identities, common_name=name, **dates)  # type: ignore[arg-type]
        cert, key = self.folder / f"{name}.pem", self.folder / f"{name}.key"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        return cert, key


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(trustme.CA(), tmp_path)


@pytest.fixture
def tls_server(pki: Pki) -> Iterator[socketcomm.Server]:
    cert, key = pki.issue("server", "127.0.0.1", "localhost")
    with socketcomm.Server(mode="ack", tls=socketcomm.ServerTls(cert, key)) as server:
        yield server


def test_messages_and_files_over_tls(pki: Pki, tmp_path: Path) -> None:
    cert, key = pki.issue("server", "127.0.0.1", "localhost")
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    source = tmp_path / "notes.bin"
    source.write_bytes(bytes(range(256)) * 4000)
    tls = socketcomm.ServerTls(cert, key)
    assert tls.fingerprint.startswith("sha256:") and not tls.mutual
    with socketcomm.Server(mode="echo", tls=tls, upload_dir=uploads) as server:
        assert server.tls_fingerprint == tls.fingerprint
        for host in ("127.0.0.1", "localhost"):
            trust = socketcomm.ClientTls(ca=pki.ca_file)
            with socketcomm.Client(host, server.address[1], tls=trust, timeout=10) as client:
                assert client.encrypted
                assert client.request("over TLS") == b"over TLS"
                assert client.request(b"x" * 2_000_000) == b"x" * 2_000_000
        with socketcomm.Client(*server.address, tls=trust, timeout=10) as client:
            sent = client.send_file(source)
        assert (uploads / "notes.bin").read_bytes() == source.read_bytes()
        assert sent.size == source.stat().st_size


def test_mutual_tls_shows_who_the_client_is(pki: Pki) -> None:
    cert, key = pki.issue("server", "127.0.0.1")
    client_cert, client_key = pki.issue("alice", "alice@example.org")
    tls = socketcomm.ServerTls(cert, key, client_ca=pki.ca_file)
    assert tls.mutual
    with socketcomm.Server(tls=tls) as server:
        with_cert = socketcomm.ClientTls(ca=pki.ca_file, cert=client_cert, key=client_key)
        with socketcomm.Client(*server.address, tls=with_cert, timeout=10) as client:
            client.send("hi")
            connected = server.recv(timeout=10)
            message = server.recv(timeout=10)
        assert isinstance(connected, socketcomm.Connected)
        assert isinstance(message, socketcomm.Message)
        for event in (connected, message):
            identity = event.peer_identity
            assert identity is not None
            assert identity.subject.endswith("CN=alice")
            assert identity.names == ["alice@example.org"]
        without = socketcomm.ClientTls(ca=pki.ca_file)
        with pytest.raises(socketcomm.TlsError, match="requires a client certificate"):
            socketcomm.Client(*server.address, tls=without, timeout=10)
        deadline = time.monotonic() + 5  # counted just after the handshake ends
        while server.stats()["tls_failures"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.stats()["tls_failures"] == 1


def test_failed_checks_raise_tls_error_naming_the_reason(pki: Pki, tmp_path: Path) -> None:
    trusted = socketcomm.ClientTls(ca=pki.ca_file)
    (tmp_path / "other").mkdir()
    other = Pki(trustme.CA(), tmp_path / "other")
    cases = [
        (pki.issue("wrong-name", "example.org"), trusted, "not valid for the name"),
        (pki.issue("expired", "127.0.0.1", expired=True), trusted, "expired"),
        (other.issue("stranger", "127.0.0.1"), trusted, "unknown issuer"),
    ]
    for (cert, key), trust, reason in cases:
        with socketcomm.Server(mode="echo", tls=socketcomm.ServerTls(cert, key)) as server:
            with pytest.raises(socketcomm.TlsError, match=reason) as error:
                socketcomm.Client(*server.address, tls=trust, timeout=10)
            assert isinstance(error.value, ConnectionError)
            assert isinstance(error.value, socketcomm.SocketCommError)
    self_signed = socketcomm.ServerTls.self_signed()
    with socketcomm.Server(mode="echo", tls=self_signed) as server:
        pinned = socketcomm.ClientTls(fingerprint=self_signed.fingerprint)
        with socketcomm.Client(*server.address, tls=pinned, timeout=10) as client:
            assert client.request("pinned") == b"pinned"
        wrong = socketcomm.ClientTls(fingerprint="sha256:" + "00" * 32)
        with pytest.raises(socketcomm.TlsError, match="fingerprint mismatch"):
            socketcomm.Client(*server.address, tls=wrong, timeout=10)
        with pytest.raises(socketcomm.TlsError, match="unknown issuer"):
            socketcomm.Client(*server.address, tls=trusted, timeout=10)


def test_plaintext_and_tls_at_the_wrong_port(pki: Pki, tls_server: socketcomm.Server) -> None:
    with pytest.raises(socketcomm.TlsError, match="requires TLS"):
        socketcomm.Client(*tls_server.address, timeout=10)
    with socket.create_connection(tls_server.address, timeout=10) as plain:
        plain.sendall(b"Hello World")
        assert plain.recv(1024).startswith(b"this server requires TLS")
    with socketcomm.Server(mode="echo") as plaintext:
        trust = socketcomm.ClientTls(ca=pki.ca_file)
        with pytest.raises(socketcomm.TlsError, match="may not serve TLS"):
            socketcomm.Client(*plaintext.address, tls=trust, timeout=10)
        with socketcomm.Client(*plaintext.address, timeout=10) as client:
            assert client.request("still serving") == b"still serving"
    trust = socketcomm.ClientTls(ca=pki.ca_file)
    with socketcomm.Client(*tls_server.address, tls=trust, timeout=10) as client:
        assert client.request("hi") == socketcomm.ACK_REPLY
    assert tls_server.stats()["tls_failures"] == 2  # counted before the answers were written


def test_a_stalled_handshake_is_dropped(pki: Pki) -> None:
    cert, key = pki.issue("server", "127.0.0.1")
    tls = socketcomm.ServerTls(cert, key)
    with socketcomm.Server(tls=tls, tls_handshake_timeout=0.3) as server:
        with socket.create_connection(server.address, timeout=10) as silent:
            started = time.monotonic()
            assert silent.recv(1024) == b""  # closed by the server
            assert 0.25 < time.monotonic() - started < 5
        # Counted just after the connection is dropped.
        deadline = time.monotonic() + 5
        while server.stats()["tls_failures"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.stats()["tls_failures"] == 1


def test_unreadable_files_fail_at_construction_with_the_path(pki: Pki, tmp_path: Path) -> None:
    cert, _ = pki.issue("server", "127.0.0.1")
    with pytest.raises(FileNotFoundError, match=r"tls_key .*missing\.key"):
        socketcomm.ServerTls(cert, tmp_path / "missing.key")
    with pytest.raises(FileNotFoundError, match=r"tls_ca .*nowhere\.pem"):
        socketcomm.ClientTls(ca=tmp_path / "nowhere.pem")
    with pytest.raises(socketcomm.TlsError, match="no PEM certificate"):
        socketcomm.ServerTls(tmp_path / "server.key", tmp_path / "server.key")
    with pytest.raises(ValueError, match="tls_fingerprint"):
        socketcomm.ClientTls(fingerprint="not a fingerprint")
    with pytest.raises(ValueError, match="tls_min_version"):
        socketcomm.ServerTls(cert, tmp_path / "server.key", min_version="1.1")


def ssl_client_context(pki: Pki, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    if maximum is not None:
        context.maximum_version = maximum
    return context


def test_pythons_ssl_module_as_a_raw_and_a_framed_client(
    pki: Pki, tls_server: socketcomm.Server
) -> None:
    context = ssl_client_context(pki)
    with socket.create_connection(tls_server.address, timeout=10) as raw_socket:
        with context.wrap_socket(raw_socket, server_hostname="127.0.0.1") as tls_socket:
            assert tls_socket.version() == "TLSv1.3"
            tls_socket.sendall(b"Hello World")
            assert tls_socket.recv(1024) == socketcomm.ACK_REPLY
    with socket.create_connection(tls_server.address, timeout=10) as raw_socket:
        with context.wrap_socket(raw_socket, server_hostname="localhost") as tls_socket:
            tls_socket.sendall(HELLO)
            assert recv_exactly(tls_socket, 12)[:6] == HELLO[:6]
            body = b"framed over ssl"
            tls_socket.sendall(struct.pack("!IBI", 5 + len(body), 0x02, 7) + body)
            length, kind, request_id = struct.unpack("!IBI", recv_exactly(tls_socket, 9))
            assert (kind, request_id) == (0x03, 7)
            assert recv_exactly(tls_socket, length - 5) == socketcomm.ACK_REPLY


def test_tls_1_2_only_when_allowed(pki: Pki) -> None:
    cert, key = pki.issue("server", "127.0.0.1")
    old_client = ssl_client_context(pki, maximum=ssl.TLSVersion.TLSv1_2)
    with socketcomm.Server(mode="ack", tls=socketcomm.ServerTls(cert, key)) as strict:
        with socket.create_connection(strict.address, timeout=10) as raw_socket:
            with pytest.raises(ssl.SSLError):
                old_client.wrap_socket(raw_socket, server_hostname="127.0.0.1")
    lenient = socketcomm.ServerTls(cert, key, min_version="1.2")
    with socketcomm.Server(mode="ack", tls=lenient) as server:
        with socket.create_connection(server.address, timeout=10) as raw_socket:
            with old_client.wrap_socket(raw_socket, server_hostname="127.0.0.1") as tls_socket:
                assert tls_socket.version() == "TLSv1.2"
                tls_socket.sendall(b"hi")
                assert tls_socket.recv(1024) == socketcomm.ACK_REPLY


def serve_ssl_once(context: ssl.SSLContext, framed: bool) -> tuple[int, threading.Thread]:
    """A Python ``ssl`` server for one client: raw, it echoes one read; framed, it answers the
    hello and one request with its reply."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        with listener, context.wrap_socket(listener, server_side=True) as tls_listener:
            conn, _ = tls_listener.accept()
            with conn:
                if not framed:
                    conn.sendall(conn.recv(1024))
                    return
                assert recv_exactly(conn, 12)[:4] == HELLO[:4]
                conn.sendall(HELLO)
                length, _, request_id = struct.unpack("!IBI", recv_exactly(conn, 9))
                body = recv_exactly(conn, length - 5)
                conn.sendall(struct.pack("!IBI", 5 + len(body), 0x03, request_id) + body)
                conn.recv(1024)  # the client's close frame, or the end

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return port, thread


@pytest.mark.parametrize("framed", [False, True])
def test_our_client_against_a_python_ssl_server(pki: Pki, framed: bool) -> None:
    cert, key = pki.issue("server", "127.0.0.1")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    port, thread = serve_ssl_once(context, framed)
    trust = socketcomm.ClientTls(ca=pki.ca_file)
    with socketcomm.Client("127.0.0.1", port, tls=trust, raw=not framed, timeout=10) as client:
        assert client.request("across implementations") == b"across implementations"
    thread.join(timeout=10)


OPENSSL = shutil.which("openssl")


def s_client(port: int, pki: Pki, send: bytes, expect: int, *extra: str) -> bytes:
    """Runs ``openssl s_client`` against ``port``, sends ``send``, reads ``expect`` bytes of
    answer (within 20 s) and stops it."""
    assert OPENSSL is not None
    command = [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-quiet"]
    command += ["-CAfile", str(pki.ca_file), "-verify_return_error", *extra]
    process = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        process.stdin.write(send)
        process.stdin.flush()
        answer = b""
        deadline = time.monotonic() + 20
        while len(answer) < expect and time.monotonic() < deadline:
            ready, _, _ = select.select([process.stdout], [], [], 0.1)
            if ready:
                chunk = os.read(process.stdout.fileno(), 4096)
                if not chunk:
                    break
                answer += chunk
        return answer
    finally:
        process.kill()
        process.communicate(timeout=10)


@pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")
def test_openssl_s_client_raw_and_with_a_client_certificate(pki: Pki) -> None:
    cert, key = pki.issue("server", "127.0.0.1")
    client_cert, client_key = pki.issue("bob", "bob.example")
    with socketcomm.Server(mode="ack", tls=socketcomm.ServerTls(cert, key)) as server:
        answer = s_client(server.address[1], pki, b"Hello World", len(socketcomm.ACK_REPLY))
    assert answer == socketcomm.ACK_REPLY
    mutual = socketcomm.ServerTls(cert, key, client_ca=pki.ca_file)
    with socketcomm.Server(mode="ack", tls=mutual) as server:
        identity = ["-cert", str(client_cert), "-key", str(client_key)]
        answer = s_client(server.address[1], pki, b"hi", len(socketcomm.ACK_REPLY), *identity)
        connected = server.recv(timeout=10)
    assert answer == socketcomm.ACK_REPLY
    assert isinstance(connected, socketcomm.Connected)
    assert connected.peer_identity is not None
    assert connected.peer_identity.subject.endswith("CN=bob")
    assert connected.peer_identity.names == ["bob.example"]


def test_the_command_line_with_a_self_signed_certificate() -> None:
    server = ServerProcess("--tls-self-signed")
    try:
        line = server.wait_for_line("stderr", r"--tls-fingerprint (sha256:[0-9a-f]{64})")
        fingerprint = line.group(1)
        port = str(server.port)
        client = [sys.executable, "client.py", "--port", port]
        pinned = run([*client, "--tls-fingerprint", fingerprint])
        assert pinned.returncode == 0, pinned.stderr
        assert pinned.stdout.strip() == socketcomm.ACK_REPLY.decode()
        plain = run(client)
        assert plain.returncode == 1 and "requires TLS" in plain.stderr
        wrong = run([*client, "--tls-fingerprint", "sha256:" + "0" * 64])
        assert wrong.returncode == 1 and "fingerprint mismatch" in wrong.stderr
    finally:
        code, _, _ = server.stop()
    assert code == 0


def test_the_command_line_with_a_ca_and_client_certificates(pki: Pki) -> None:
    cert, key = pki.issue("server", "127.0.0.1")
    client_cert, client_key = pki.issue("carol", "carol.example")
    flags = ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(pki.ca_file)]
    server = ServerProcess(*flags)
    try:
        port = str(server.port)
        base = [sys.executable, "client.py", "--port", port, "--tls-ca", str(pki.ca_file)]
        done = run(
            [*base, "--tls-client-cert", str(client_cert), "--tls-client-key", str(client_key)]
        )
        assert done.returncode == 0, done.stderr
        refused = run(base)
        assert refused.returncode == 1 and "client certificate" in refused.stderr
    finally:
        server.stop()
    missing = run([sys.executable, "server.py", "--port", "0", "--tls-cert", str(cert)], 20)
    assert missing.returncode == 2 and "--tls-key" in missing.stderr


def test_asyncio_client_over_tls(pki: Pki, tls_server: socketcomm.Server) -> None:
    import asyncio

    import socketcomm.aio

    async def main() -> bytes:
        trust = socketcomm.ClientTls(ca=pki.ca_file)
        async with socketcomm.aio.Client(*tls_server.address, tls=trust, timeout=10) as client:
            return await client.request("async over TLS")

    assert asyncio.run(main()) == socketcomm.ACK_REPLY
    with pytest.raises(socketcomm.TlsError, match="requires TLS"):
        asyncio.run(socketcomm.aio.connect(*tls_server.address, timeout=10))


def test_a_client_silent_after_its_handshake_is_dropped_by_hello_timeout(pki: Pki) -> None:
    # It completes the TLS handshake, then says nothing: it used to be held for ever.
    cert, key = pki.issue("server", "127.0.0.1")
    tls = socketcomm.ServerTls(cert, key)
    with socketcomm.Server(tls=tls, hello_timeout=0.3) as server:
        context = ssl_client_context(pki)
        with socket.create_connection(server.address, timeout=10) as raw_socket:
            with context.wrap_socket(raw_socket, server_hostname="127.0.0.1") as tls_socket:
                started = time.monotonic()
                # Closed by the server (with or without a close_notify: closed either way).
                with contextlib.suppress(ssl.SSLEOFError, ConnectionResetError):
                    assert tls_socket.recv(1024) == b""
                assert 0.25 < time.monotonic() - started < 5
        deadline = time.monotonic() + 5
        while server.stats()["idle_timeouts"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.stats()["idle_timeouts"] == 1


def test_large_echoes_over_tls_never_stall(pki: Pki) -> None:
    # A TLS writer may keep the last records of a large answer in its own buffer when the
    # socket would block; unflushed, they waited for the connection's next write (about one
    # echo of 2 MB in 250 stalled here under load).
    cert, key = pki.issue("server", "127.0.0.1")
    trust = socketcomm.ClientTls(ca=pki.ca_file)
    payload = b"x" * 2_000_000
    with socketcomm.Server(mode="echo", tls=socketcomm.ServerTls(cert, key)) as server:
        for _ in range(60):
            with socketcomm.Client(*server.address, tls=trust, timeout=5) as client:
                for _ in range(5):
                    assert client.request(payload) == payload
