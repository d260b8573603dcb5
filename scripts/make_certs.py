#!/usr/bin/env python3
"""Make the TLS certificates of a SuperLink and the authentication keys of its SuperNodes.

Needs only the ``cryptography`` package (a Flower dependency, so in every venv that runs the app);
no ``openssl`` or ``ssh-keygen`` binary. Writes into ``--out`` (default ``certs/``)::

    ca.crt, ca.key                the certificate authority (keep ca.key off the network)
    server.pem, server.key        the SuperLink's certificate (signed by the CA) and key
    supernode_<k>, supernode_<k>.pub
                                  SuperNode k's ECDSA P-384 key pair in OpenSSH format

``ca.crt`` goes to every SuperNode (``--root-certificates``) and to the machine that runs
``flwr`` (``root-certificates`` in ``$FLWR_HOME/config.toml``). ``server.pem`` / ``server.key``
stay on the SuperLink machine. ``supernode_<k>`` (private) goes to client machine k only;
``supernode_<k>.pub`` is registered with ``flwr supernode register``.

Usage::

    python scripts/make_certs.py --out certs --hosts superlink.example.org,10.0.0.5 --supernodes 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
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
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, 0o600 if private else 0o644)


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


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
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )  # digital_signature, key_cert_sign, crl_sign
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
        .sign(ca_key, hashes.SHA256())
    )
    _write(out / "server.key", _pem_key(key), private=True)
    _write(out / "server.pem", cert.public_bytes(serialization.Encoding.PEM), private=False)


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
    parser.add_argument("--force", action="store_true", help="overwrite an existing CA")
    args = parser.parse_args(argv)
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    if not hosts:
        parser.error("--hosts needs at least one name or address")
    if (args.out / "ca.crt").exists() and not args.force:
        print(f"{args.out / 'ca.crt'} exists; pass --force to make a new CA (every node must then get it)")
    else:
        ca_key, ca = make_ca(args.out)
        make_server_cert(args.out, ca_key, ca, hosts)
        print(f"wrote {args.out}/ca.crt, ca.key, server.pem, server.key (SANs: {', '.join(hosts)})")
    for k in range(args.supernodes):
        if not (args.out / f"supernode_{k}").exists():
            make_supernode_key(args.out, f"supernode_{k}")
    if args.supernodes:
        print(f"wrote {args.out}/supernode_<k> and supernode_<k>.pub for k = 0..{args.supernodes - 1}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
