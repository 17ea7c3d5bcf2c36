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
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fahr_core.io import PRIVATE_FILE_MODE, atomic_write_bytes, make_private_dir

# A site name becomes file names (<site>.key, <site>.pub): no separators, no leading dot (hidden
# files, '..'), nothing a shell or another OS would read differently.
SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class ServerTLS:
    ca_cert: Path
    cert: Path
    key: Path


def _refuse_existing(paths: Sequence[Path], force: bool, consequence: str) -> None:
    """FileExistsError naming every file already there, unless `force` (then they are replaced)."""
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise FileExistsError(
            f"{', '.join(existing)} already exist(s); nothing was written. Replacing {consequence}; "
            "pass --force if that is what you want"
        )


def _write(path: Path, data: bytes, force: bool, private: bool = False) -> None:
    """Created exclusively unless `force`; private keys 0600 from the first byte (never 0644)."""
    atomic_write_bytes(path, data, PRIVATE_FILE_MODE if private else None, exclusive=not force)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fahr federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def create_server_tls(out: Path, hosts: Sequence[str], days: int = 825, force: bool = False) -> ServerTLS:
    """A CA (ca.crt/ca.key) and a server certificate for `hosts` (DNS names or IP addresses).

    Existing files are refused (FileExistsError) unless `force`: a new CA invalidates the ca.crt
    every site holds.
    """
    if not hosts:
        raise ValueError("the server certificate needs at least one host name or IP address")
    out = Path(out)
    names = ("ca.crt", "ca.key", "server.crt", "server.key")
    _refuse_existing([out / n for n in names], force, "the CA means every site needs the new ca.crt")
    make_private_dir(out)
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
    sans = _with_loopback(sans)
    key = ec.generate_private_key(ec.SECP384R1())
    cert = _server_certificate(ca_cert, ca_key, key, _name(hosts[0]), sans, days)
    pem = serialization.Encoding.PEM
    no_password = serialization.NoEncryption()
    tls = ServerTLS(out / "ca.crt", out / "server.crt", out / "server.key")
    pkcs8 = serialization.PrivateFormat.PKCS8
    _write(out / "ca.key", ca_key.private_bytes(pem, pkcs8, no_password), force, private=True)
    _write(tls.key, key.private_bytes(pem, pkcs8, no_password), force, private=True)
    _write(tls.ca_cert, ca_cert.public_bytes(pem), force)
    _write(tls.cert, cert.public_bytes(pem), force)
    return tls


def _with_loopback(sans: list[x509.GeneralName]) -> list[x509.GeneralName]:
    """`sans` plus 127.0.0.1 and ::1: a SuperLink listening on every interface starts a SuperExec that
    dials the loopback address and checks this certificate against it (fahr_ops.flower)."""
    loopback = [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1")]
    return sans + [name for name in loopback if name not in sans]


def _server_certificate(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    key: ec.EllipticCurvePrivateKey,
    subject: x509.Name,
    sans: Sequence[x509.GeneralName],
    days: int,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
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


@dataclass(frozen=True)
class Renewal:
    cert: Path
    valid_until: dt.datetime
    ca_reissued: bool  # ca.crt changed (same key and name): every site needs the new file


def renew_server_tls(out: Path, days: int = 825) -> Renewal:
    """A new server.crt for the same key, names and CA, valid for `days` from now.

    The server key stays, so nothing else on the server changes. If the CA certificate would expire
    before the new server certificate, it is re-issued too, with the same key and name: certificates
    it signed stay valid, but sites must be given the new ca.crt before the old one expires.
    """
    out = Path(out)
    for name in ("ca.crt", "ca.key", "server.crt", "server.key"):
        if not (out / name).is_file():
            raise FileNotFoundError(f"{out / name} not found: renewal needs what `fahr certs init` wrote")
    ca_cert = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), password=None)
    old = x509.load_pem_x509_certificate((out / "server.crt").read_bytes())
    key = serialization.load_pem_private_key((out / "server.key").read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{out}: ca.key and server.key must be the EC keys `fahr certs init` wrote")
    sans = _with_loopback(list(old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value))
    cert = _server_certificate(ca_cert, ca_key, key, old.subject, sans, days)
    reissue = ca_cert.not_valid_after_utc < cert.not_valid_after_utc
    pem = serialization.Encoding.PEM
    if reissue:
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(ca_cert.subject)
            .issuer_name(ca_cert.subject)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(cert.not_valid_after_utc + dt.timedelta(days=days))
        )
        for ext in ca_cert.extensions:
            builder = builder.add_extension(ext.value, critical=ext.critical)
        atomic_write_bytes(out / "ca.crt", builder.sign(ca_key, hashes.SHA384()).public_bytes(pem))
    atomic_write_bytes(out / "server.crt", cert.public_bytes(pem))
    return Renewal(out / "server.crt", cert.not_valid_after_utc, reissue)


def create_site_keys(out: Path, site: str, force: bool = False) -> tuple[Path, Path]:
    """The site's identity: `<site>.key` (private, stays at the site) and `<site>.pub` (to the server).

    ValueError for a name that is not a plain file name; FileExistsError if either file exists,
    unless `force` (a replaced key locks the site out until the server registers the new .pub).
    """
    if not SITE_NAME.fullmatch(site):
        raise ValueError(
            f"site name {site!r} must be 1-64 letters, digits, '_', '-' or '.', starting with a letter "
            "or digit (it names the key files)"
        )
    private = Path(out) / f"{site}.key"
    public = Path(out) / f"{site}.pub"
    _refuse_existing(
        [private, public], force, "a site's key locks it out until the server registers the new .pub"
    )
    make_private_dir(Path(out))
    key = ec.generate_private_key(ec.SECP384R1())
    openssh = serialization.PrivateFormat.OpenSSH
    _write(
        private,
        key.private_bytes(serialization.Encoding.PEM, openssh, serialization.NoEncryption()),
        force,
        True,
    )
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(public, pub + b"\n", force)
    return private, public
