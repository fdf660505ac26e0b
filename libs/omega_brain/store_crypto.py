"""Encryption at rest of the store's personal values: key derivation, sealing, row tokens.

A store created with an ``encryption_key`` records ``meta['encryption']`` = `CIPHER` and
``meta['key_check']``, `KEY_CHECK` sealed under `KEY_CHECK_AD`, which tells a wrong key from a
damaged row. The personal values of ``events``, ``patterns`` (embedding, counts, times),
``history``, ``pending_views`` and the unconfirmed send are sealed with AES-256-GCM, a random
96-bit nonce per value (``nonce || ciphertext || tag`` in the row's ``sealed`` column, the plain
columns holding placeholders) and the table and row identity as associated data (the ``*_ad``
functions below), so a value moved to another row does not decrypt. Rows keyed by a content id
are keyed by a token, ``~`` + HMAC-SHA256 of the id under a key derived from the host's (HKDF),
so equal ids find their row without the id on disk. Catalog, global patterns, trending and the
model are public and stay plain, as do versions and pattern ids (the server knows them).

This module knows nothing of SQLite; `omega_brain.store_personal` decides what is sealed.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from omega_brain.errors import StoreError

__all__ = [
    "CIPHER",
    "KEY_CHECK",
    "KEY_CHECK_AD",
    "UNCONFIRMED_SEND_AD",
    "Sealer",
    "event_ad",
    "history_ad",
    "pattern_ad",
    "pending_views_ad",
]

CIPHER = "aes-256-gcm"
"""``meta['encryption']`` of an encrypted store."""
KEY_CHECK = b"omega-brain key check v1"
"""The known plaintext of ``meta['key_check']``."""
KEY_CHECK_AD = b"meta:key_check"
UNCONFIRMED_SEND_AD = b"meta:unconfirmed_send"
_NONCE_BYTES = 12
_TAG_BYTES = 16


class Sealer:
    """AES-256-GCM for the values of one encrypted store, and the HMAC row tokens.

    Args:
        key: the host's 32-byte key; two subkeys are derived from it with HKDF-SHA256 (one
            for AES-GCM, one for tokens), so the raw key is used for nothing else.

    Raises:
        StoreError: the key is not 32 bytes.
    """

    __slots__ = ("_aead", "_token_key")

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) != 32:
            raise StoreError("the encryption key must be 32 bytes")
        self._aead = AESGCM(_derive(key, b"omega-brain store aes-256-gcm"))
        self._token_key = _derive(key, b"omega-brain store row tokens")

    def __repr__(self) -> str:
        return "_Sealer(<key hidden>)"

    def seal(self, plaintext: bytes, ad: bytes) -> bytes:
        """``nonce || ciphertext || tag`` of ``plaintext`` bound to ``ad``."""
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, ad)

    def open(self, blob: object, ad: bytes, *, what: str) -> bytes:
        """The plaintext of a sealed value.

        Raises:
            StoreError: the value is not a sealed blob, or does not authenticate (another
                key, tampered bytes, or moved from another row).
        """
        if not isinstance(blob, bytes) or len(blob) < _NONCE_BYTES + _TAG_BYTES:
            raise StoreError(f"{what} is not encrypted as expected; the store is corrupt")
        try:
            return self._aead.decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], ad)
        except InvalidTag:
            raise StoreError(
                f"{what} does not decrypt: the store is damaged or was tampered with"
            ) from None

    def token(self, text: str) -> str:
        """The row key standing for ``text`` (deterministic, reveals nothing without the key)."""
        return "~" + hmac.new(self._token_key, text.encode(), hashlib.sha256).hexdigest()


def _derive(key: bytes, label: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(key)


def event_ad(event_id: int) -> bytes:
    """Associated data of the sealed values of event ``event_id``."""
    return b"events:%d" % event_id


def history_ad(token: str) -> bytes:
    """Associated data of the ``history`` row keyed by ``token``."""
    return b"history:" + token.encode()


def pending_views_ad(token: str) -> bytes:
    """Associated data of the ``pending_views`` row keyed by ``token``."""
    return b"pending_views:" + token.encode()


def pattern_ad(bucket: int, pattern_id: str) -> bytes:
    """Associated data of the ``patterns`` row of ``bucket``."""
    return f"patterns:{bucket}:{pattern_id}".encode()
