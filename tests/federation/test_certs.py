"""scripts/make_certs.py: certificates that a strict TLS client accepts, private keys 0600 from the start."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "make_certs.py"


def make_certs(*args: str) -> subprocess.CompletedProcess[str]:
    # umask 0: a key that were written first and chmod-ed later would be world-readable in between
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
        preexec_fn=lambda: os.umask(0),
    )  # fmt: skip


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    made = make_certs("--out", str(out), "--hosts", "localhost,127.0.0.1", "--supernodes", "2")
    assert made.returncode == 0, made.stderr
    return out


def strict_client() -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


def handshake(certs: Path, client: ssl.SSLContext, host: str) -> dict:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(certs / "server.pem", certs / "server.key")
    listener = socket.create_server(("127.0.0.1", 0))
    errors: list[BaseException] = []

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError) as err:
            errors.append(err)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        raw = socket.create_connection(listener.getsockname(), timeout=10)
        with client.wrap_socket(raw, server_hostname=host) as tls:
            peer = tls.getpeercert()
            tls.sendall(b"x")
    finally:
        thread.join(timeout=10)
        listener.close()
    return peer


def test_server_certificate_passes_strict_verification(certs: Path) -> None:
    client = strict_client()
    client.load_verify_locations(certs / "ca.crt")
    for host in ("localhost", "127.0.0.1"):
        peer = handshake(certs, client, host)
        assert peer["subject"][0][0] == ("commonName", "localhost")


def test_strict_verification_still_rejects_a_foreign_ca(certs: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    assert make_certs("--out", str(other), "--hosts", "localhost").returncode == 0
    client = strict_client()
    client.load_verify_locations(other / "ca.crt")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(certs, client, "localhost")


def test_private_keys_are_0600_and_public_files_are_not_secret(certs: Path) -> None:
    for key in ("ca.key", "server.key", "superexec.secret", "supernode_0", "supernode_1"):
        assert mode(certs / key) == 0o600, key
    for public in ("ca.crt", "server.pem", "supernode_0.pub"):
        assert mode(certs / public) == 0o644, public


def test_supernode_only_makes_one_key_pair_and_no_ca(tmp_path: Path) -> None:
    made = make_certs("--supernode-only", "--out", str(tmp_path / "site"), "--name", "site_a")
    assert made.returncode == 0, made.stderr
    assert sorted(p.name for p in (tmp_path / "site").iterdir()) == ["site_a", "site_a.pub"]
    assert mode(tmp_path / "site" / "site_a") == 0o600
    assert (tmp_path / "site" / "site_a.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    again = make_certs("--supernode-only", "--out", str(tmp_path / "site"), "--name", "site_a")
    assert again.returncode == 1 and "exists" in again.stdout  # a site's key is never silently replaced
