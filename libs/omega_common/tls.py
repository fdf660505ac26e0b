"""TLS for every gRPC server and client: credentials from PEM files, and a development PKI.

Production mounts certificates from its secret store (cert-manager, a Kubernetes Secret);
`dev_pki` writes a throw-away one for the local stack and the tests (the ``cryptography``
package): one CA, a server certificate for the loopback names, and client certificates (the
federation worker's, used for mutual TLS on the shards' federation listener).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "DevPki",
    "channel_credentials",
    "dev_pki",
    "server_credentials",
]


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} {path}: {exc.strerror}") from exc


def server_credentials(
    cert_file: Path, key_file: Path, client_ca_file: Path | None = None
) -> grpc.ServerCredentials:
    """Server TLS credentials; with ``client_ca_file`` clients must present a certificate it
    signed (mutual TLS).

    Raises:
        ValueError: a file cannot be read.
    """
    cert = _read(cert_file, "TLS certificate")
    key = _read(key_file, "TLS key")
    assert cert is not None and key is not None
    ca = _read(client_ca_file, "client CA")
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


def channel_credentials(
    ca_file: Path | None, cert_file: Path | None = None, key_file: Path | None = None
) -> grpc.ChannelCredentials:
    """Client TLS credentials: trust ``ca_file`` (None: the system roots) and, for mutual TLS,
    present ``cert_file`` / ``key_file``.

    Raises:
        ValueError: a file cannot be read, or only one of cert and key is given.
    """
    if (cert_file is None) != (key_file is None):
        raise ValueError("a client certificate needs both its certificate and its key file")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file, "CA certificate"),
        private_key=_read(key_file, "client key"),
        certificate_chain=_read(cert_file, "client certificate"),
    )


@dataclass(frozen=True)
class DevPki:
    """Paths of a development PKI written by `dev_pki` (PEM files)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_certs: dict[str, tuple[Path, Path]]
    """Client name -> (certificate, key)."""


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Exogenesis Omega (development)"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def dev_pki(
    folder: Path,
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    clients: Sequence[str] = ("federation-worker",),
    days: int = 30,
) -> DevPki:
    """Write a CA, a server certificate for ``hosts`` and one client certificate per name.

    ECDSA P-256 keys (key files mode 0600), SHA-256 signatures, valid from an hour ago for
    ``days``. For development and tests only: the CA key stays in ``folder``.

    Args:
        folder: Created if missing; existing files are overwritten.
        hosts: IP addresses or DNS names of the server certificate's subjectAltName.
        clients: Common names of the client certificates (extended key usage clientAuth).
        days: Validity.

    Returns:
        The file paths.
    """
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    until = now + dt.timedelta(days=days)
    ca_key = _key()
    ca_name = _name("Omega development CA")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(
        common_name: str, usage: x509.ObjectIdentifier, names: Sequence[str]
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = _key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(until)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if names:
            alt: list[x509.GeneralName] = []
            for host in names:
                try:
                    alt.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    alt.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    def write(
        cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, stem: str
    ) -> tuple[Path, Path]:
        cert_path, key_path = folder / f"{stem}.crt", folder / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key_path, key)
        return cert_path, key_path

    ca_cert, _ = write(ca, ca_key, "ca")
    server = leaf(hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, hosts)
    server_cert, server_key = write(*server, "server")
    client_files = {
        name: write(*leaf(name, ExtendedKeyUsageOID.CLIENT_AUTH, ()), f"client-{name}")
        for name in clients
    }
    return DevPki(ca_cert, server_cert, server_key, client_files)
