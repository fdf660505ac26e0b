"""TLS for every gRPC server and client: credentials from PEM files, and a development PKI.

Servers follow a rotation of their files while running (`ServerTls`: gRPC's dynamic server
credentials, re-read when the files change, a broken set refused); clients read the files when
they open their channels (the periodic federation worker re-opens them when they change).

Production mounts certificates from its secret store (cert-manager, a Kubernetes Secret);
`dev_pki` writes a throw-away one for the local stack and the tests (the ``cryptography``
package): one CA, a server certificate for the loopback names, and client certificates (the
federation worker's, used for mutual TLS on the shards' federation listener).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from omega_common.watched_files import WatchedFiles

__all__ = [
    "DevPki",
    "ServerTls",
    "channel_credentials",
    "check_pem_files",
    "dev_pki",
]

_log = structlog.get_logger(component="tls")


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} {path}: {exc.strerror}") from exc


@dataclass(frozen=True)
class _ServerMaterial:
    """One checked set of a server's PEM files."""

    cert: bytes
    key: bytes = field(repr=False)
    ca: bytes | None

    def configuration(self, with_client_ca: bool) -> grpc.ServerCertificateConfiguration:
        """This material as gRPC's server certificate configuration; the CA (to verify
        client certificates) only when ``with_client_ca``."""
        return grpc.ssl_server_certificate_configuration(
            [(self.key, self.cert)], root_certificates=self.ca if with_client_ca else None
        )


def check_pem_files(
    cert_file: Path | None, key_file: Path | None, ca_file: Path | None = None
) -> tuple[bytes | None, bytes | None, bytes | None]:
    """Read and check a certificate chain, its private key and a CA bundle (each optional).

    The certificate and key must parse as PEM and the key must be the certificate's (same
    public key); the CA file must hold at least one PEM certificate. A half-written file fails
    here rather than in a TLS handshake.

    Returns:
        (cert, key, ca) bytes; None for a file not given.

    Raises:
        ValueError: a file cannot be read or parsed, or the key does not match the certificate.
    """
    cert = _read(cert_file, "TLS certificate")
    key = _read(key_file, "TLS key")
    ca = _read(ca_file, "CA certificate")
    if cert is not None:
        try:
            leaf = x509.load_pem_x509_certificates(cert)[0]
        except ValueError as exc:
            raise ValueError(f"{cert_file} is not a PEM certificate: {exc}") from exc
    if key is not None:
        try:
            private = serialization.load_pem_private_key(key, password=None)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{key_file} is not an unencrypted PEM private key") from exc
        if cert is not None:
            spki = serialization.PublicFormat.SubjectPublicKeyInfo
            der = serialization.Encoding.DER
            if leaf.public_key().public_bytes(der, spki) != private.public_key().public_bytes(
                der, spki
            ):
                raise ValueError(f"the key {key_file} does not match the certificate {cert_file}")
    if ca is not None:
        try:
            x509.load_pem_x509_certificates(ca)
        except ValueError as exc:
            raise ValueError(f"{ca_file} is not a PEM CA bundle: {exc}") from exc
    return cert, key, ca


def _load_server_material(
    cert_file: Path, key_file: Path, client_ca_file: Path | None
) -> _ServerMaterial:
    cert, key, ca = check_pem_files(cert_file, key_file, client_ca_file)
    assert cert is not None and key is not None
    return _ServerMaterial(cert, key, ca)


class ServerTls:
    """A server's TLS files, re-read when they change while it runs (certificate rotation).

    `credentials` gives each listener ``grpc.dynamic_ssl_server_credentials``: gRPC core asks
    its fetcher for a new certificate configuration on new handshakes. The fetcher checks the
    files' stamps at most once per ``recheck_seconds`` (`WatchedFiles`); when they changed it
    reads and checks them (`check_pem_files`) and hands gRPC the new configuration. A broken
    set (unreadable, half written, a key of another certificate) is logged and counted once per
    change and the previous configuration kept: a listener never goes down over a secret being
    written. Established connections keep their session; new ones get the new certificate.
    Several listeners share one instance, so the files are checked and a reload logged once.

    Args:
        cert_file: PEM certificate chain of the server.
        key_file: Its PEM private key.
        client_ca_file: CA bundle verifying client certificates (for mutual TLS listeners).
        recheck_seconds: Least time between two checks of the files.
        on_reload: Called with ``"ok"`` or ``"refused"`` once per change (a metric).

    Raises:
        ValueError: the files cannot be read or checked at start.
    """

    def __init__(
        self,
        cert_file: Path,
        key_file: Path,
        client_ca_file: Path | None = None,
        recheck_seconds: float = 5.0,
        on_reload: Callable[[str], None] | None = None,
    ) -> None:
        self._files = WatchedFiles((cert_file, key_file, client_ca_file), recheck_seconds)
        self._paths = (cert_file, key_file, client_ca_file)
        self._material = _load_server_material(*self._paths)
        self._version = 0
        self._on_reload = on_reload
        self._lock = threading.Lock()

    def _current(self) -> tuple[_ServerMaterial, int]:
        if self._files.changed():
            with self._lock:
                self._reload()
        return self._material, self._version

    def _reload(self) -> None:
        files = [str(p) for p in self._paths if p is not None]
        try:
            material = _load_server_material(*self._paths)
        except ValueError as exc:
            _log.warning("tls_reload_refused", files=files, error=str(exc))
            outcome = "refused"
        else:
            if material != self._material:
                self._material = material
                self._version += 1
            _log.info("tls_reloaded", files=files, version=self._version)
            outcome = "ok"
        if self._on_reload is not None:
            self._on_reload(outcome)

    def credentials(self, require_client_auth: bool = False) -> grpc.ServerCredentials:
        """Credentials of one listener; with ``require_client_auth`` clients must present a
        certificate signed by ``client_ca_file`` (mutual TLS).

        Raises:
            ValueError: ``require_client_auth`` without a ``client_ca_file``.
        """
        if require_client_auth and self._paths[2] is None:
            raise ValueError("mutual TLS needs a client CA file")
        material, version = self._current()
        served = [version]

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            # Called by gRPC core (its own threads) on new handshakes: None keeps the current
            # configuration. Never raise into gRPC core.
            try:
                material, version = self._current()
                if version == served[0]:
                    return None
                served[0] = version
                return material.configuration(require_client_auth)
            except Exception:  # pragma: no cover - defensive
                _log.exception("tls_fetch_failed")
                return None

        return grpc.dynamic_ssl_server_credentials(
            material.configuration(require_client_auth),
            fetch,
            require_client_authentication=require_client_auth,
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
