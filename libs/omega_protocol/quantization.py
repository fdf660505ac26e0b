"""Embeddings on the wire: int8 with a per-vector scale, float16 or float32.

int8 symmetric quantization (scale = max|x| / 127, q = round(x / scale)) keeps a 384-dim unit
vector in 384 bytes + 4 with a worst-case per-component error of scale / 2, about 0.002 for a
unit vector; the cosine to the original stays above 0.999 in practice.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from omega.v1 import patterns_pb2

__all__ = [
    "EMBEDDING_DIM",
    "EmbeddingError",
    "decode_embedding",
    "decode_embeddings",
    "dequantize_int8",
    "encode_embedding",
    "encode_embeddings",
    "quantize_int8",
]

EMBEDDING_DIM = 384
"""Dimension of all-MiniLM-L6-v2 sentence embeddings."""

Encoding = int  # an omega.v1.EmbeddingEncoding value

_ITEMSIZE: dict[int, int] = {
    patterns_pb2.EMBEDDING_ENCODING_INT8: 1,
    patterns_pb2.EMBEDDING_ENCODING_FLOAT16: 2,
    patterns_pb2.EMBEDDING_ENCODING_FLOAT32: 4,
}
_DTYPE: dict[int, np.dtype[Any]] = {
    patterns_pb2.EMBEDDING_ENCODING_INT8: np.dtype(np.int8),
    patterns_pb2.EMBEDDING_ENCODING_FLOAT16: np.dtype("<f2"),
    patterns_pb2.EMBEDDING_ENCODING_FLOAT32: np.dtype("<f4"),
}


class EmbeddingError(ValueError):
    """An embedding with the wrong dimension, a bad encoding, or non-finite values."""


_MIN_PEAK = np.float32(np.finfo(np.float32).tiny) * np.float32(127.0)


def quantize_int8(
    vectors: npt.ArrayLike,
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]:
    """Symmetric per-vector int8 quantization.

    Args:
        vectors: (n, d) or (d,) float array; must be finite.

    Returns:
        ``(codes, scales)``: codes (n, d) int8 in [-127, 127] and scales (n,) float32 with
        ``vectors ~= codes * scales[:, None]`` (for a 1-d input, shapes (d,) and ()); a
        vector whose largest magnitude is below 127 x float32's smallest normal number
        (about 1.5e-36) gets zero codes and scale 0.

    Raises:
        EmbeddingError: when a value is NaN or infinite.
    """
    x = np.asarray(vectors, dtype=np.float32)
    if not np.all(np.isfinite(x)):
        raise EmbeddingError("embedding has NaN or infinite values")
    peak = np.max(np.abs(x), axis=-1, keepdims=True)
    # A step below float32's smallest normal number would be subnormal (imprecise, or 0):
    # such vectors (peak < 1.5e-36, never an embedding) quantize to zero codes and scale 0.
    scales = np.where(peak >= _MIN_PEAK, peak / 127.0, 0.0).astype(np.float32)
    safe = np.where(scales > 0, scales, np.float32(1.0))
    codes = np.clip(np.rint(x / safe), -127, 127).astype(np.int8)
    return codes, scales[..., 0]


def dequantize_int8(codes: npt.NDArray[np.int8], scales: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """Inverse of `quantize_int8`: (n, d) int8 and (n,) float32 -> (n, d) float32."""
    s = np.asarray(scales, dtype=np.float32)
    return (codes.astype(np.float32) * s[..., None]).astype(np.float32)


def encode_embedding(
    vector: npt.ArrayLike, encoding: Encoding = patterns_pb2.EMBEDDING_ENCODING_INT8
) -> patterns_pb2.Embedding:
    """Encode one vector as an `omega.v1.Embedding`.

    Args:
        vector: (d,) float array, finite.
        encoding: an `EmbeddingEncoding` value (INT8 by default).

    Raises:
        EmbeddingError: non-finite values, a non 1-d input or an unknown encoding.
    """
    x = np.asarray(vector, dtype=np.float32)
    if x.ndim != 1:
        raise EmbeddingError(f"expected a 1-d vector, got shape {x.shape}")
    return encode_embeddings(x[None, :], encoding)[0]


def encode_embeddings(
    vectors: npt.ArrayLike, encoding: Encoding = patterns_pb2.EMBEDDING_ENCODING_INT8
) -> list[patterns_pb2.Embedding]:
    """Encode a batch of vectors, one `omega.v1.Embedding` each.

    Args:
        vectors: (n, d) float array, finite.
        encoding: an `EmbeddingEncoding` value.

    Raises:
        EmbeddingError: non-finite values, wrong rank or an unknown encoding.
    """
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim != 2:
        raise EmbeddingError(f"expected an (n, d) array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise EmbeddingError("embedding has NaN or infinite values")
    dim = x.shape[1]
    wire = patterns_pb2.EmbeddingEncoding.ValueType(encoding)
    if encoding == patterns_pb2.EMBEDDING_ENCODING_INT8:
        codes, scales = quantize_int8(x)
        return [
            patterns_pb2.Embedding(encoding=wire, dim=dim, scale=float(s), data=c.tobytes())
            for c, s in zip(codes, scales, strict=True)
        ]
    if encoding in _DTYPE:
        rows = x.astype(_DTYPE[encoding])
        return [patterns_pb2.Embedding(encoding=wire, dim=dim, data=r.tobytes()) for r in rows]
    raise EmbeddingError(f"unknown embedding encoding {encoding}")


def decode_embedding(
    embedding: patterns_pb2.Embedding, expected_dim: int = EMBEDDING_DIM
) -> npt.NDArray[np.float32]:
    """Decode and validate one `omega.v1.Embedding`.

    Args:
        embedding: the wire message.
        expected_dim: the dimension the receiver works with.

    Returns:
        (expected_dim,) float32.

    Raises:
        EmbeddingError: unknown encoding, a dimension other than ``expected_dim``, a byte
            length that does not match the dimension, or NaN/infinite values or scale.
    """
    enc = embedding.encoding
    if enc not in _DTYPE:
        raise EmbeddingError(f"unknown embedding encoding {enc}")
    if embedding.dim != expected_dim:
        raise EmbeddingError(f"embedding has dimension {embedding.dim}, expected {expected_dim}")
    expected_bytes = expected_dim * _ITEMSIZE[enc]
    if len(embedding.data) != expected_bytes:
        raise EmbeddingError(
            f"embedding carries {len(embedding.data)} bytes, expected {expected_bytes}"
        )
    raw = np.frombuffer(embedding.data, dtype=_DTYPE[enc])
    if enc == patterns_pb2.EMBEDDING_ENCODING_INT8:
        scale = np.float32(embedding.scale)
        if not np.isfinite(scale) or scale < 0:
            raise EmbeddingError(f"invalid int8 scale {embedding.scale}")
        with np.errstate(over="ignore"):  # an overflow is reported below, as an error
            out = raw.astype(np.float32) * scale
    else:
        out = raw.astype(np.float32)
    if not np.all(np.isfinite(out)):
        raise EmbeddingError("embedding has NaN or infinite values")
    return out


def decode_embeddings(
    embeddings: Iterable[patterns_pb2.Embedding] | Sequence[patterns_pb2.Embedding],
    expected_dim: int = EMBEDDING_DIM,
) -> npt.NDArray[np.float32]:
    """Decode a batch: returns (n, expected_dim) float32. Raises `EmbeddingError` as above."""
    rows = [decode_embedding(e, expected_dim) for e in embeddings]
    if not rows:
        return np.zeros((0, expected_dim), dtype=np.float32)
    return np.stack(rows)
