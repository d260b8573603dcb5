#!/usr/bin/env python3
"""Make the TLS certificates of a SuperLink and the authentication keys of its SuperNodes.

Needs only the ``cryptography`` package (a Flower dependency, so in every venv that runs the app);
no ``openssl`` or ``ssh-keygen`` binary. Writes into ``--out`` (default ``certs/``)::

    ca.crt, ca.key                the certificate authority (keep ca.key off the network)
    server.pem, server.key        the SuperLink's certificate (signed by the CA) and key
    superexec.secret              shared secret of the SuperLink and its SuperExec
                                  (``--superexec-auth-secret-file``, process isolation)
    supernode_<k>, supernode_<k>.pub
                                  SuperNode k's ECDSA P-384 key pair in OpenSSH format

``ca.crt`` goes to every SuperNode (``--root-certificates``) and to the machine that runs
``flwr`` (``root-certificates`` in ``$FLWR_HOME/config.toml``). ``server.pem`` / ``server.key``
stay on the SuperLink machine. A site makes its own SuperNode key pair on its own machine
(``--supernode-only``) and sends only the ``.pub`` to the operator, who registers it with
``flwr supernode register``; ``--supernodes N`` (all pairs on one machine) is for tests and demos.

Private keys are created with mode 0600 (``os.open``, so they are never readable by others, not
even for a moment); certificates carry Subject / Authority Key Identifiers and KeyUsage, so they
pass strict X.509 verification (``ssl.VERIFY_X509_STRICT``, Python 3.13's default).

Usage::

    python scripts/make_certs.py --out certs --hosts superlink.example.org,10.0.0.5   # operator
    python scripts/make_certs.py --supernode-only --out keys --name site_a             # each site
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import secrets
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

# Ten years: a research federation should not stop when a certificate lapses mid-project.
VALID_DAYS = 3650
RSA_BITS = 4096  # the CA and server keys; Flower's own examples use 4096-bit RSA
NIST_CURVE = ec.SECP384R1  # SuperNode keys: Flower 1.41 accepts NIST EC curves (P-384 in its docs)


def _write(path: Path, data: bytes, private: bool) -> None:
    """Write ``data``; a private key is created 0600 (owner only) and stays so, whatever the umask."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = 0o600 if private else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # an existing file keeps its old mode through O_CREAT: set it
        os.write(fd, data)
    finally:
        os.close(fd)


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(**set_bits: bool) -> x509.KeyUsage:
    bits = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
            "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")  # fmt: skip
    return x509.KeyUsage(**{bit: set_bits.get(bit, False) for bit in bits})


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_ca(out: Path) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("pf2lora-ca"))
        .issuer_name(_name("pf2lora-ca"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(out / "ca.key", _pem_key(key), private=True)
    _write(out / "ca.crt", cert.public_bytes(serialization.Encoding.PEM), private=False)
    return key, cert


def make_server_cert(out: Path, ca_key: rsa.RSAPrivateKey, ca: x509.Certificate, hosts: list[str]) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_key_usage(digital_signature=True, key_encipherment=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(out / "server.key", _pem_key(key), private=True)
    _write(out / "server.pem", cert.public_bytes(serialization.Encoding.PEM), private=False)


def make_superexec_secret(out: Path) -> None:
    """32 random bytes (hex) that the SuperLink and its SuperExec share; kept if it exists."""
    if not (out / "superexec.secret").exists():
        _write(out / "superexec.secret", secrets.token_hex(32).encode(), private=True)


def make_supernode_key(out: Path, name: str) -> Path:
    """``<out>/<name>`` (OpenSSH private key) and ``<out>/<name>.pub``; returns the public key's path."""
    key = ec.generate_private_key(NIST_CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(out / name, private, private=True)
    _write(out / f"{name}.pub", public + f" {name}\n".encode(), private=False)
    return out / f"{name}.pub"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("certs"), help="output directory (default: certs)")
    parser.add_argument(
        "--hosts",
        default="localhost,127.0.0.1",
        help="comma-separated DNS names / IPs the SuperLink is reached at (the certificate's SANs)",
    )
    parser.add_argument("--supernodes", type=int, default=0, help="how many SuperNode key pairs to make")
    parser.add_argument("--force", action="store_true", help="overwrite an existing CA or key pair")
    parser.add_argument(
        "--supernode-only",
        action="store_true",
        help="make only this site's SuperNode key pair (<out>/<name>, <name>.pub): keep the key, send the .pub",
    )
    parser.add_argument("--name", default="supernode", help="file name of the --supernode-only key pair")
    args = parser.parse_args(argv)
    if args.supernode_only:
        return _supernode_only(args.out, args.name, args.force)
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    if not hosts:
        parser.error("--hosts needs at least one name or address")
    if (args.out / "ca.crt").exists() and not args.force:
        print(f"{args.out / 'ca.crt'} exists; pass --force to make a new CA (every node must then get it)")
    else:
        ca_key, ca = make_ca(args.out)
        make_server_cert(args.out, ca_key, ca, hosts)
        make_superexec_secret(args.out)
        print(f"wrote {args.out}/ca.crt, ca.key, server.pem, server.key, superexec.secret (SANs: {', '.join(hosts)})")
    for k in range(args.supernodes):
        if not (args.out / f"supernode_{k}").exists():
            make_supernode_key(args.out, f"supernode_{k}")
    if args.supernodes:
        print(f"wrote {args.out}/supernode_<k> and supernode_<k>.pub for k = 0..{args.supernodes - 1}")
    return 0


def _supernode_only(out: Path, name: str, force: bool) -> int:
    if (out / name).exists() and not force:
        print(f"{out / name} exists; pass --force to replace it (then register the new .pub)")
        return 1
    public = make_supernode_key(out, name)
    print(f"wrote {out / name} (private, mode 0600: stays on this machine) and {public} (send it to the operator)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
