"""TLS in three ways: a certificate signed by your own CA, a self-signed certificate pinned by
its fingerprint, and mutual TLS that tells the server who the client is.

    python examples/tls_echo.py

It makes its certificates in memory (the self-signed one) or asks openssl for them (the CA),
so it needs the `openssl` command for the CA part.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import socketcomm


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca_and_certificates(folder: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate for "alice"."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"]
    ca, ca_key = str(folder / "ca.pem"), str(folder / "ca.key")
    openssl("req", "-x509", *ec, "-subj", "/CN=Example CA", "-keyout", ca_key, "-out", ca)
    for name, san in (("server", "IP:127.0.0.1"), ("alice", "email:alice@example.org")):
        key, request, cert = (str(folder / f"{name}.{ext}") for ext in ("key", "csr", "pem"))
        extensions = folder / f"{name}.ext"
        extensions.write_text(f"subjectAltName={san}\n")
        openssl("req", "-new", *ec[:5], "-subj", f"/CN={name}", "-keyout", key, "-out", request)
        signing = ["-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "1"]
        openssl("x509", "-req", "-in", request, *signing, "-extfile", str(extensions), "-out", cert)


def main() -> None:
    # 1. Self-signed, for development: the client pins the fingerprint the server prints.
    tls = socketcomm.ServerTls.self_signed()
    with socketcomm.Server("127.0.0.1", 0, mode="echo", tls=tls) as server:
        pinned = socketcomm.ClientTls(fingerprint=tls.fingerprint)
        with socketcomm.Client(*server.address, tls=pinned) as client:
            print("self-signed:", client.request("hello").decode())

    if shutil.which("openssl") is None:
        print("(openssl is not installed: skipping the CA examples)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_ca_and_certificates(folder)
        # 2. A certificate signed by a CA the client trusts.
        tls = socketcomm.ServerTls(folder / "server.pem", folder / "server.key")
        with socketcomm.Server("127.0.0.1", 0, mode="echo", tls=tls) as server:
            trust = socketcomm.ClientTls(ca=folder / "ca.pem")
            with socketcomm.Client(*server.address, tls=trust) as client:
                print("CA-signed:", client.request("hello").decode())
        # 3. Mutual TLS: the server requires a client certificate and sees who sent each message.
        tls = socketcomm.ServerTls(
            folder / "server.pem", folder / "server.key", client_ca=folder / "ca.pem"
        )
        with socketcomm.Server("127.0.0.1", 0, tls=tls) as server:
            alice = socketcomm.ClientTls(
                ca=folder / "ca.pem", cert=folder / "alice.pem", key=folder / "alice.key"
            )
            with socketcomm.Client(*server.address, tls=alice) as client:
                client.send("hello from alice")
                for event in server:
                    if isinstance(event, socketcomm.Message) and event.peer_identity:
                        identity = event.peer_identity
                        print(f"mutual: {event.text!r} from {identity.subject} {identity.names}")
                        break


if __name__ == "__main__":
    main()
