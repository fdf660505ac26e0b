"""Hostile values for every protobuf field type, and zstd frames that misbehave.

Each scalar type has a *primary* value (the one most likely to break a server: above the
signed range, NaN, NUL) and *secondary* ones; the fuzzer's sweep tries the primary value of
every field first, then the secondary ones, then random combinations.
"""

from __future__ import annotations

import functools
import random
from typing import Any, Final

import zstandard
from google.protobuf.descriptor import FieldDescriptor

__all__ = [
    "HUGE_REPEATED",
    "benign_value",
    "garbage_bytes",
    "hostile_values",
    "random_value",
    "zstd_frames",
]

HUGE_REPEATED: Final[int] = 10_000
"""Elements of a "huge" repeated field."""

_UINT64: Final[list[int]] = [2**64 - 1, 2**63, 2**63 - 1, 0, 2**32, 2**53 + 1, 1]
_INT64: Final[list[int]] = [-(2**63), 2**63 - 1, -1, 0, 2**31, -(2**31) - 1]
_UINT32: Final[list[int]] = [2**32 - 1, 2**31, 2**31 - 1, 0, 1]
_INT32: Final[list[int]] = [-(2**31), 2**31 - 1, -1, 0]
_FLOAT: Final[list[float]] = [
    float("nan"),
    float("inf"),
    float("-inf"),
    3.4028234663852886e38,
    -1e38,
    1e30,
    1.401298464324817e-45,
    -0.0,
    -1.0,
]
_DOUBLE: Final[list[float]] = [
    float("nan"),
    float("inf"),
    float("-inf"),
    1.7976931348623157e308,
    -1e308,
    5e-324,
    -1.0,
]
_STRINGS: Final[list[str]] = [
    "id\x00nul",
    "\x01\x1b[31m\x7f\x85",
    "x" * 100_000,
    "",
    "é✓🙂\u202e\u200d",
    " ",
    "x" * 129,
    "y" * 257,
    "' OR 1=1 --",
    "../../etc/passwd",
    "%s%n%x{0}",
    "\ufeff\u2028",
]

_INTEGER_TYPES: Final[dict[int, list[int]]] = {
    FieldDescriptor.TYPE_UINT64: _UINT64,
    FieldDescriptor.TYPE_FIXED64: _UINT64,
    FieldDescriptor.TYPE_INT64: _INT64,
    FieldDescriptor.TYPE_SINT64: _INT64,
    FieldDescriptor.TYPE_SFIXED64: _INT64,
    FieldDescriptor.TYPE_UINT32: _UINT32,
    FieldDescriptor.TYPE_FIXED32: _UINT32,
    FieldDescriptor.TYPE_INT32: _INT32,
    FieldDescriptor.TYPE_SINT32: _INT32,
    FieldDescriptor.TYPE_SFIXED32: _INT32,
}


@functools.cache
def zstd_frames() -> tuple[bytes, ...]:
    """Misbehaving zstd frames: bombs with and without a declared size, truncated, garbage.

    The bombs expand 16 MiB of zeros from a few hundred bytes.
    """
    zeros = b"\x00" * (16 << 20)
    bomb = zstandard.ZstdCompressor(level=19).compress(zeros)
    hidden = zstandard.ZstdCompressor(level=19, write_content_size=False).compress(zeros)
    noise = random.Random(7).randbytes(4096)
    valid_noise = zstandard.ZstdCompressor().compress(noise)
    return (
        bomb,
        hidden,
        bomb[: len(bomb) // 2],
        valid_noise,
        b"\x28\xb5\x2f\xfd" + noise[:64],  # zstd magic, then garbage
        bomb + bomb,  # two frames
    )


def garbage_bytes(rng: random.Random) -> bytes:
    """Random bytes of a random (mostly small) length."""
    size = rng.choice([0, 1, 2, 3, 7, 16, 64, 384, 1000, 4096, 65_536])
    return rng.randbytes(size)


def _enum_values(field: FieldDescriptor) -> list[Any]:
    enum = field.enum_type
    return list(enum.values) if enum is not None else []


def hostile_values(field: FieldDescriptor) -> list[Any]:
    """Hostile values for one (non-repeated) scalar field, primary first.

    Message fields have none (the fuzzer clears or fills them instead).
    """
    kind = field.type
    if kind in _INTEGER_TYPES:
        return list(_INTEGER_TYPES[kind])
    if kind == FieldDescriptor.TYPE_FLOAT:
        return list(_FLOAT)
    if kind == FieldDescriptor.TYPE_DOUBLE:
        return list(_DOUBLE)
    if kind == FieldDescriptor.TYPE_BOOL:
        return [True, False]
    if kind == FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in _enum_values(field)]
        return [2**31 - 1, -1, 99, *known]
    if kind == FieldDescriptor.TYPE_STRING:
        return list(_STRINGS)
    if kind == FieldDescriptor.TYPE_BYTES:
        rng = random.Random(11)
        return [rng.randbytes(64), b"", *zstd_frames(), b"\x00" * 100_000, b"\xff" * 385]
    return []


def benign_value(field: FieldDescriptor, rng: random.Random) -> Any:
    """A plausible value for a scalar field (so that hostile ones hide among normal ones)."""
    kind = field.type
    if kind in _INTEGER_TYPES:
        return rng.choice([0, 1, 2, 5, 10, 100, 1000])
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return rng.choice([0.0, 0.5, 1.0, 0.9, 2.0, 1e-3])
    if kind == FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if kind == FieldDescriptor.TYPE_ENUM:
        return rng.choice([v.number for v in _enum_values(field)])
    if kind == FieldDescriptor.TYPE_STRING:
        return rng.choice(["a", "c0001", "fuzz", "tv-1", "p-evening", "omega.v1.Federation"])
    if kind == FieldDescriptor.TYPE_BYTES:
        return garbage_bytes(rng)
    raise ValueError(f"no scalar value for field {field.full_name}")


def random_value(field: FieldDescriptor, rng: random.Random, hostility: float = 0.5) -> Any:
    """A hostile value with probability ``hostility``, else a benign one."""
    hostile = hostile_values(field)
    if hostile and rng.random() < hostility:
        return rng.choice(hostile)
    return benign_value(field, rng)
