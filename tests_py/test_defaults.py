"""Secure defaults, checked: loopback unless told otherwise, file receiving off unless
``upload_dir`` is set, bounded frames and files, and no secrets or payloads in the logs."""

from __future__ import annotations

import inspect
import logging
import sys
import time
from pathlib import Path

import pytest
import trustme

import socketcomm

from conftest import run


def test_servers_listen_on_loopback_unless_told_otherwise() -> None:
    with socketcomm.Server() as server:
        assert server.address[0] == "127.0.0.1"
    assert socketcomm.DEFAULT_HOST == "127.0.0.1"
    shown = run([sys.executable, "server.py", "--print-config"], 20)
    assert 'host = "127.0.0.1"  # default' in shown.stdout


def test_receiving_files_is_off_unless_upload_dir_is_set(tmp_path: Path) -> None:
    source = tmp_path / "a.txt"
    source.write_text("data")
    assert inspect.signature(socketcomm.Server).parameters["upload_dir"].default is None
    with socketcomm.Server() as server, socketcomm.Client(*server.address) as client:
        with pytest.raises(socketcomm.TransferError) as refused:
            client.send_file(source)
    assert refused.value.status == "refused"


def test_frames_and_files_are_bounded_by_default() -> None:
    assert socketcomm.DEFAULT_MAX_FRAME == 16 << 20
    assert socketcomm.DEFAULT_MAX_FILE_SIZE == 16 << 30
    with socketcomm.Server(mode="echo") as server, socketcomm.Client(*server.address) as client:
        with pytest.raises(socketcomm.FrameTooLargeError):
            client.send(b"x" * (16 << 20))


def test_no_secrets_or_payloads_in_the_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1")
    client_cert = ca.issue_cert("client.example")
    files = {}
    for name, blob in (
        ("ca.pem", ca.cert_pem),
        ("server.pem", server_cert.cert_chain_pems[0]),
        ("server.key", server_cert.private_key_pem),
        ("client.pem", client_cert.cert_chain_pems[0]),
        ("client.key", client_cert.private_key_pem),
    ):
        files[name] = tmp_path / name
        blob.write_to_path(str(files[name]))
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text("file-content-SECRET-7f3a")
    caplog.set_level(logging.DEBUG, logger="socketcomm")
    tls = socketcomm.ServerTls(files["server.pem"], files["server.key"], client_ca=files["ca.pem"])
    with socketcomm.Server(tls=tls, upload_dir=uploads) as server:
        trust = socketcomm.ClientTls(
            ca=files["ca.pem"], cert=files["client.pem"], key=files["client.key"]
        )
        with socketcomm.Client(*server.address, tls=trust, timeout=10) as client:
            client.send("message-SECRET-91c2")
            client.send_file(secret_file)
        for _ in range(3):
            server.recv(timeout=10)
        # A failed handshake is logged too, with its reason but nothing secret.
        with pytest.raises(socketcomm.TlsError):
            socketcomm.Client(*server.address, tls=socketcomm.ClientTls(ca=files["ca.pem"]))
    # Records reach `logging` through the forwarding thread (src/python/logging.rs): give it
    # its turn at the GIL.
    deadline = time.monotonic() + 5
    while "handshake failed" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.01)
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "the TLS handshake failed" in logged  # the server's logs were captured
    for secret in (
        "message-SECRET-91c2",
        "file-content-SECRET-7f3a",
        "PRIVATE KEY",
        *(
            line
            for key in ("server.key", "client.key")
            for line in files[key].read_text().splitlines()[1:-1]
        ),
    ):
        assert secret not in logged, secret


def test_log_records_carry_the_public_module_names(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="socketcomm.server")
    with socketcomm.Server(mode="echo") as server, socketcomm.Client(*server.address) as client:
        assert client.request("hi") == b"hi"
    deadline = time.monotonic() + 5
    while not any("connection 1 from" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, "no connection record reached logging"
        time.sleep(0.01)
    names = {r.name for r in caplog.records if "connection 1 from" in r.getMessage()}
    assert names == {"socketcomm.server.handler"}
