"""Device identity: HMAC-SHA256 tokens bound to a device id, under a rotating fleet secret.

A token is issued once per device (``omega-constellation issue-token``, at manufacturing or
first activation) and sent by the device as gRPC metadata ``authorization: Bearer <token>``
on every call. Its form is four dot-separated fields::

    v1.<device id, base64url>.<key id>.<issued at, unix seconds>.<MAC, base64url>

with ``MAC = HMAC-SHA256(fleet_secret[key id], "omega-device-token/v1" 0x00 device_id 0x00
key_id 0x00 issued_at)`` (RFC 2104; the fields are NUL-separated so no two inputs share an
encoding). The key id names one of several fleet secrets, which makes rotation possible:
servers accept every configured key id, new tokens are issued under the current one, and a
retired key id is removed once its devices were re-issued. The device id travels in the token,
so a server tells a forged or damaged token (UNAUTHENTICATED) from a valid token presented for
another device's id (PERMISSION_DENIED).

Secrets come from the environment or a file, never from the repository: a JSON object
``{"<key id>": "<secret, base64>", ...}``; each secret must decode to at least 32 bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

import structlog

from omega_common.watched_files import WatchedFiles

__all__ = [
    "METADATA_KEY",
    "AuthenticationError",
    "DeviceCredential",
    "FleetKeys",
    "FleetKeysFile",
    "TokenVerifier",
    "bearer",
    "token_from_metadata",
]

METADATA_KEY: Final[str] = "authorization"
"""gRPC metadata key of the credential (lower case, as gRPC requires)."""

_VERSION: Final[str] = "v1"
_DOMAIN: Final[bytes] = b"omega-device-token/v1"
_MIN_SECRET_BYTES: Final[int] = 32
_KEY_ID: Final[re.Pattern[str]] = re.compile(r"[A-Za-z0-9_-]{1,32}")
_MAX_TOKEN_CHARS: Final[int] = 1024
_MAX_DEVICE_ID_BYTES: Final[int] = 256

_log = structlog.get_logger(component="auth")


class AuthenticationError(Exception):
    """A credential that is missing, malformed, unknown, forged or expired."""


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise AuthenticationError("malformed token")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise AuthenticationError("malformed token") from exc


@dataclass(frozen=True, slots=True)
class DeviceCredential:
    """What a verified token says.

    Attributes:
        device_id: The device the token was issued to.
        key_id: The fleet key that signed it.
        issued_at: Unix seconds.
    """

    device_id: str
    key_id: str
    issued_at: int


class FleetKeys:
    """The fleet secrets a server accepts and the one new tokens are signed with.

    Args:
        secrets: Key id -> secret (>= 32 bytes). Key ids: 1-32 characters of
            ``[A-Za-z0-9_-]``.
        current: The key id new tokens are issued under; must be in ``secrets``.
        max_age_seconds: Tokens older than this are refused; None: tokens never expire.

    Raises:
        ValueError: no secret, a bad key id, a short secret, or ``current`` not configured.
    """

    def __init__(
        self,
        secrets: Mapping[str, bytes],
        current: str,
        max_age_seconds: float | None = None,
    ) -> None:
        if not secrets:
            raise ValueError("at least one fleet key is needed")
        for key_id, secret in secrets.items():
            if not _KEY_ID.fullmatch(key_id):
                raise ValueError(f"key id {key_id!r} must be 1-32 characters of [A-Za-z0-9_-]")
            if len(secret) < _MIN_SECRET_BYTES:
                raise ValueError(f"the secret of key {key_id!r} is shorter than 32 bytes")
        if current not in secrets:
            raise ValueError(f"current key id {current!r} is not among the configured keys")
        if max_age_seconds is not None and not max_age_seconds > 0:
            raise ValueError(f"max_age_seconds must be > 0, got {max_age_seconds!r}")
        self._secrets = dict(secrets)
        self.current = current
        self.max_age_seconds = max_age_seconds

    @classmethod
    def from_json(
        cls, text: str, current: str | None = None, max_age_seconds: float | None = None
    ) -> FleetKeys:
        """Keys from ``{"<key id>": "<secret, base64>"}``; ``current`` defaults to the last.

        Raises:
            ValueError: not a JSON object of base64 strings, or as the constructor.
        """
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError("fleet keys must be a JSON object") from exc
        if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
            raise ValueError('fleet keys must be a JSON object {"<key id>": "<base64>"}')
        secrets: dict[str, bytes] = {}
        for key_id, value in raw.items():
            try:
                secrets[str(key_id)] = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ValueError(f"the secret of key {key_id!r} is not base64") from exc
        if current is None and secrets:
            current = list(secrets)[-1]
        return cls(secrets, current or "", max_age_seconds)

    @classmethod
    def from_file(
        cls, path: Path, current: str | None = None, max_age_seconds: float | None = None
    ) -> FleetKeys:
        """`from_json` of a file's contents (a mounted Kubernetes Secret, for example)."""
        return cls.from_json(path.read_text(), current, max_age_seconds)

    @property
    def key_ids(self) -> tuple[str, ...]:
        """Every accepted key id."""
        return tuple(self._secrets)

    def _mac(self, key_id: str, device_id: str, issued_at: int) -> bytes:
        message = b"\x00".join(
            (_DOMAIN, device_id.encode("utf-8"), key_id.encode(), str(issued_at).encode())
        )
        return hmac.new(self._secrets[key_id], message, hashlib.sha256).digest()

    def issue(self, device_id: str, issued_at: int | None = None, key_id: str | None = None) -> str:
        """A token for ``device_id`` under ``key_id`` (default: the current key).

        Raises:
            ValueError: an empty or over-long device id, control characters in it, or an
                unknown key id.
        """
        if not device_id or len(device_id.encode("utf-8")) > _MAX_DEVICE_ID_BYTES:
            raise ValueError("device_id must be 1-256 bytes of UTF-8")
        if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in device_id):
            raise ValueError("device_id must not contain control characters")
        key_id = self.current if key_id is None else key_id
        if key_id not in self._secrets:
            raise ValueError(f"unknown key id {key_id!r}")
        at = int(time.time()) if issued_at is None else int(issued_at)
        mac = self._mac(key_id, device_id, at)
        return ".".join(
            (_VERSION, _b64url(device_id.encode("utf-8")), key_id, str(at), _b64url(mac))
        )

    def verify(self, token: str, now: float | None = None) -> DeviceCredential:
        """Check a token's MAC (constant time), key id and age.

        Returns:
            The credential; the caller compares its ``device_id`` with the request's.

        Raises:
            AuthenticationError: malformed, unknown key id, bad MAC, issued in the future
                (beyond 5 minutes of clock skew) or older than ``max_age_seconds``.
        """
        if len(token) > _MAX_TOKEN_CHARS:
            raise AuthenticationError("malformed token")
        parts = token.split(".")
        if len(parts) != 5 or parts[0] != _VERSION:
            raise AuthenticationError("malformed token")
        _, device_b64, key_id, issued_text, mac_b64 = parts
        if not issued_text.isdigit() or len(issued_text) > 12:
            raise AuthenticationError("malformed token")
        try:
            device_id = _unb64url(device_b64).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise AuthenticationError("malformed token") from exc
        if key_id not in self._secrets:
            raise AuthenticationError("unknown key id")
        issued_at = int(issued_text)
        expected = self._mac(key_id, device_id, issued_at)
        if not hmac.compare_digest(expected, _unb64url(mac_b64)):
            raise AuthenticationError("bad token signature")
        clock = time.time() if now is None else now
        if issued_at > clock + 300:
            raise AuthenticationError("token issued in the future")
        if self.max_age_seconds is not None and clock - issued_at > self.max_age_seconds:
            raise AuthenticationError("token expired")
        return DeviceCredential(device_id, key_id, issued_at)


class TokenVerifier(Protocol):
    """What a server checks tokens with: `FleetKeys`, or `FleetKeysFile` (reloaded)."""

    def verify(self, token: str, now: float | None = None) -> DeviceCredential:
        """See `FleetKeys.verify`."""
        ...


class FleetKeysFile:
    """Fleet keys read from a file and re-read when it changes (key rotation without restart).

    `verify` checks the file's stamp (`WatchedFiles`: inode, mtime, size) at most once per
    ``recheck_seconds``, so a token check costs a clock read, not a ``stat``. A changed file is
    read and parsed (`FleetKeys.from_json`); a file that does not parse, or lacks ``current``,
    is logged and counted once per change and the previous keys kept.

    Args:
        path: The JSON file (a mounted Secret).
        current: As `FleetKeys.from_json`; must be in every version of the file.
        max_age_seconds: As `FleetKeys`.
        recheck_seconds: Least time between two checks of the file.
        on_reload: Called with ``"ok"`` or ``"refused"`` once per change (a metric).

    Raises:
        ValueError, OSError: the file cannot be read or parsed at start.
    """

    def __init__(
        self,
        path: Path,
        current: str | None = None,
        max_age_seconds: float | None = None,
        recheck_seconds: float = 5.0,
        on_reload: Callable[[str], None] | None = None,
    ) -> None:
        self.path = path
        self._current = current
        self._max_age_seconds = max_age_seconds
        self._on_reload = on_reload
        self._files = WatchedFiles((path,), recheck_seconds)
        self._keys = FleetKeys.from_file(path, current, max_age_seconds)

    @property
    def keys(self) -> FleetKeys:
        """The keys in force (re-read first if the file changed and the check is due)."""
        if self._files.changed():
            self._reload()
        return self._keys

    def _reload(self) -> None:
        try:
            keys = FleetKeys.from_file(self.path, self._current, self._max_age_seconds)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            # The message names key ids at most, never a secret.
            _log.warning("fleet_keys_reload_refused", files=[str(self.path)], error=str(exc))
            outcome = "refused"
        else:
            self._keys = keys
            _log.info(
                "fleet_keys_reloaded",
                files=[str(self.path)],
                key_ids=list(keys.key_ids),
                current=keys.current,
            )
            outcome = "ok"
        if self._on_reload is not None:
            self._on_reload(outcome)

    @property
    def key_ids(self) -> tuple[str, ...]:
        """Every accepted key id."""
        return self.keys.key_ids

    def verify(self, token: str, now: float | None = None) -> DeviceCredential:
        """`FleetKeys.verify` with the keys in force."""
        return self.keys.verify(token, now)


def bearer(token: str) -> tuple[tuple[str, str]]:
    """The call metadata carrying ``token``: ``(("authorization", "Bearer <token>"),)``."""
    return ((METADATA_KEY, f"Bearer {token}"),)


def token_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The bearer token of a call's invocation metadata.

    Args:
        metadata: ``context.invocation_metadata()`` or ``HandlerCallDetails.invocation_metadata``
            (a sequence of ``(key, value)`` pairs, or None).

    Raises:
        AuthenticationError: no ``authorization`` entry, several, or not ``Bearer <token>``.
    """
    values = [v for k, v in (metadata or ()) if isinstance(k, str) and k.lower() == METADATA_KEY]
    if not values:
        raise AuthenticationError("missing credential")
    if len(values) > 1:
        raise AuthenticationError("more than one credential")
    value = values[0]
    if isinstance(value, bytes):
        raise AuthenticationError("malformed credential")
    scheme, _, token = str(value).partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError("credential must be 'Bearer <token>'")
    return token.strip()
