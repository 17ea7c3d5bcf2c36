"""Certificates and keys for a federation: a CA, the server's TLS certificate, and site key pairs.

TLS (server side): the SuperLink presents `server.crt` (signed by the federation's own CA, with
the server's DNS names and IP addresses as subject alternative names); sites verify it with
`ca.crt`. Site identity: each site holds an EC P-384 key pair in OpenSSH format (what Flower's
SuperNode authentication reads); the server operator registers the public half, and the
SuperLink refuses any SuperNode whose key is not registered.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fahr_core.io import atomic_write_bytes


@dataclass(frozen=True)
class ServerTLS:
    ca_cert: Path
    cert: Path
    key: Path


def _write_private(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data)
    os.chmod(path, 0o600)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fahr federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def create_server_tls(out: Path, hosts: Sequence[str], days: int = 825) -> ServerTLS:
    """A CA (ca.crt/ca.key) and a server certificate for `hosts` (DNS names or IP addresses)."""
    if not hosts:
        raise ValueError("the server certificate needs at least one host name or IP address")
    out = Path(out)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fahr federation CA"))
        .issuer_name(_name("fahr federation CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA384())
    )
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    no_password = serialization.NoEncryption()
    tls = ServerTLS(out / "ca.crt", out / "server.crt", out / "server.key")
    atomic_write_bytes(tls.ca_cert, ca_cert.public_bytes(pem))
    _write_private(out / "ca.key", ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, no_password))
    atomic_write_bytes(tls.cert, cert.public_bytes(pem))
    _write_private(tls.key, key.private_bytes(pem, serialization.PrivateFormat.PKCS8, no_password))
    return tls


def create_site_keys(out: Path, site: str) -> tuple[Path, Path]:
    """The site's identity: `<site>.key` (private, stays at the site) and `<site>.pub` (to the server)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = Path(out) / f"{site}.key"
    public = Path(out) / f"{site}.pub"
    _write_private(
        private,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    atomic_write_bytes(
        public,
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        + b"\n",
    )
    return private, public
