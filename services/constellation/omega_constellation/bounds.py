"""The primitive bounds every request field passes on the way in.

The converters (`omega_constellation.converters`) apply these field by field, before anything
is written, so a hostile value is refused with INVALID_ARGUMENT and a message naming the field
instead of failing later in Postgres (an INTERNAL error) or in the federation worker:

- identifiers (device, pattern and content ids, page tokens): 1 to N characters and no
  control character (NUL cannot be stored in a Postgres ``text``; the others have no place in
  an id);
- unsigned 64-bit integers (versions, rounds): at most 2^63 - 1, since Postgres stores them as
  a signed ``bigint``;
- timestamps in milliseconds since the epoch: in [0, 2100-01-01);
- embeddings that must be unit vectors: finite, with an L2 norm in [0.5, 2] whatever the
  encoding, so that an INT8 code times its scale (or a float16/float32 vector) cannot
  overflow float32 in later arithmetic.
"""

from __future__ import annotations

import math
import re
from typing import Final

import numpy as np
import numpy.typing as npt

from omega_common.errors import InvalidArgumentError
from omega_protocol.model_update import MAX_CONTENT_ID_CHARS

__all__ = [
    "INT64_MAX",
    "MAX_CONTENT_ID_CHARS",
    "MAX_ID_CHARS",
    "MAX_PAGE_TOKEN_CHARS",
    "MAX_TIMESTAMP_MS",
    "MAX_UNIT_NORM",
    "MIN_UNIT_NORM",
    "check_finite",
    "check_id",
    "check_int8_unit_norm",
    "check_int64",
    "check_norm",
    "check_text",
    "check_timestamp_ms",
    "check_unit_norm",
]

INT64_MAX: Final[int] = 2**63 - 1
"""Largest value a uint64 field may carry: Postgres ``bigint`` is signed."""
MAX_ID_CHARS: Final[int] = 128
"""Longest device id, pattern id or pattern key, in characters."""
MAX_PAGE_TOKEN_CHARS: Final[int] = 2048
"""Longest page token; the server's own tokens are far shorter."""
MAX_TIMESTAMP_MS: Final[int] = 4_102_444_800_000
"""2100-01-01T00:00:00Z in ms since the epoch: later timestamps are refused."""
MIN_UNIT_NORM: Final[float] = 0.5
"""Smallest L2 norm accepted for an embedding that should be a unit vector."""
MAX_UNIT_NORM: Final[float] = 2.0
"""Largest L2 norm accepted for an embedding that should be a unit vector (int8 rounding of a
unit vector changes its norm by about 1%; anything off by 2x is not an embedding)."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
"""Unicode category Cc: C0 controls (NUL included), DEL and C1 controls."""


def check_id(value: str, what: str, max_chars: int = MAX_ID_CHARS) -> str:
    """Validate an identifier (device, pattern, content id, page token).

    Args:
        value: The field's value.
        what: The field's name for the message, e.g. ``"added[0].pattern_id"``.
        max_chars: Most characters accepted.

    Returns:
        ``value``.

    Raises:
        InvalidArgumentError: empty, longer than ``max_chars`` or with a control character.
    """
    if not value or len(value) > max_chars:
        raise InvalidArgumentError(f"{what} must have 1 to {max_chars} characters")
    if _CONTROL.search(value) is not None:
        raise InvalidArgumentError(f"{what} must not contain control characters")
    return value


def check_text(value: str, what: str, max_chars: int) -> str:
    """Validate a free-text field that may be empty (content type, genre).

    Raises:
        InvalidArgumentError: longer than ``max_chars`` or with a control character.
    """
    if len(value) > max_chars:
        raise InvalidArgumentError(f"{what} must have at most {max_chars} characters")
    if _CONTROL.search(value) is not None:
        raise InvalidArgumentError(f"{what} must not contain control characters")
    return value


def check_int64(value: int, what: str) -> int:
    """Validate a uint64 field that is stored or compared as a signed 64-bit integer.

    Raises:
        InvalidArgumentError: ``value`` above 2^63 - 1.
    """
    if value > INT64_MAX:
        raise InvalidArgumentError(f"{what} must be at most 2^63 - 1, got {value}")
    return value


def check_timestamp_ms(value: int, what: str) -> int:
    """Validate a timestamp in ms since the epoch (0: unset).

    Raises:
        InvalidArgumentError: negative, or at or after 2100-01-01.
    """
    if not 0 <= value < MAX_TIMESTAMP_MS:
        raise InvalidArgumentError(
            f"{what} must be in [0, {MAX_TIMESTAMP_MS}) ms since the epoch, got {value}"
        )
    return value


def check_finite(value: float, what: str, low: float, high: float) -> float:
    """Validate a float field: finite (not NaN, not infinite) and in [low, high].

    Raises:
        InvalidArgumentError: NaN, infinite or outside the range.
    """
    if not math.isfinite(value) or not low <= value <= high:
        raise InvalidArgumentError(f"{what} must be a finite number in [{low}, {high}]")
    return value


def check_unit_norm(vector: npt.NDArray[np.float32], what: str) -> float:
    """Validate a decoded embedding that should be a unit vector.

    Args:
        vector: (d,) float32, the decoded embedding (INT8 codes times scale, or floats).
        what: The field's name for the message.

    Returns:
        The vector's L2 norm (computed in float64, so it cannot overflow).

    Raises:
        InvalidArgumentError: the zero vector, or a norm outside [`MIN_UNIT_NORM`,
            `MAX_UNIT_NORM`] (a huge INT8 scale, huge floats).
    """
    return check_norm(float(np.linalg.norm(vector.astype(np.float64))), what)


def check_int8_unit_norm(codes: bytes, scale: float, what: str) -> float:
    """`check_unit_norm` of INT8 codes times ``scale``, without decoding them to floats.

    Args:
        codes: (d,) int8 codes as bytes.
        scale: the finite, non-negative scale (checked by the caller).
        what: The field's name for the message.

    Returns:
        ``scale * ||codes||``, computed exactly in integers then float64 (cannot overflow).

    Raises:
        InvalidArgumentError: as `check_unit_norm`.
    """
    ints = np.frombuffer(codes, dtype=np.int8).astype(np.int32)
    return check_norm(scale * math.sqrt(int(ints @ ints)), what)


def check_norm(norm: float, what: str) -> float:
    """Validate the L2 norm of an embedding that should be a unit vector; returns it.

    Raises:
        InvalidArgumentError: as `check_unit_norm`.
    """
    if norm < 1e-6:
        raise InvalidArgumentError(f"{what}: embedding is the zero vector")
    if not MIN_UNIT_NORM <= norm <= MAX_UNIT_NORM:
        raise InvalidArgumentError(
            f"{what}: embedding has L2 norm {norm:.3g}, expected a unit vector"
            f" (norm in [{MIN_UNIT_NORM}, {MAX_UNIT_NORM}]); check its scale"
        )
    return norm
