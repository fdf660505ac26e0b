"""Embedding quantization and wire encodings."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from omega.v1 import patterns_pb2
from omega_protocol import (
    EmbeddingError,
    decode_embedding,
    decode_embeddings,
    dequantize_int8,
    encode_embedding,
    encode_embeddings,
    quantize_int8,
)

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@given(arrays(np.float32, (4, 384), elements=finite))
@settings(max_examples=100, deadline=None)
def test_int8_error_bounded_by_half_a_step(x: np.ndarray) -> None:
    codes, scales = quantize_int8(x)
    assert codes.dtype == np.int8 and np.all(np.abs(codes.astype(int)) <= 127)
    error = np.abs(dequantize_int8(codes, scales) - x)
    # Vectors in float32's subnormal range quantize to zero (see quantize_int8).
    tiny = 127 * float(np.finfo(np.float32).tiny)
    assert np.all(error <= scales[:, None] / 2 + 1e-6 * np.abs(x).max() + tiny)


def test_int8_keeps_cosine_of_unit_vectors() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 384)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = decode_embeddings(encode_embeddings(x))
    cos = np.sum(x * y, axis=1) / np.linalg.norm(y, axis=1)
    assert cos.min() > 0.999


@pytest.mark.parametrize(
    "encoding",
    [
        patterns_pb2.EMBEDDING_ENCODING_INT8,
        patterns_pb2.EMBEDDING_ENCODING_FLOAT16,
        patterns_pb2.EMBEDDING_ENCODING_FLOAT32,
    ],
)
def test_wire_sizes_and_round_trip(encoding: int) -> None:
    v = np.linspace(-1, 1, 384, dtype=np.float32)
    e = encode_embedding(v, encoding)
    assert len(e.data) == 384 * {1: 1, 2: 2, 3: 4}[encoding]
    tolerance = {1: 1 / 127, 2: 1e-3, 3: 0.0}[encoding]
    assert np.allclose(decode_embedding(e), v, atol=tolerance)


def test_zero_vector_encodes() -> None:
    e = encode_embedding(np.zeros(384, dtype=np.float32))
    assert e.scale == 0 and not np.any(decode_embedding(e))


@pytest.mark.parametrize(
    "bad",
    [
        patterns_pb2.Embedding(
            encoding=patterns_pb2.EMBEDDING_ENCODING_INT8, dim=128, data=b"\0" * 128
        ),
        patterns_pb2.Embedding(
            encoding=patterns_pb2.EMBEDDING_ENCODING_INT8, dim=384, data=b"\0" * 10
        ),
        patterns_pb2.Embedding(encoding=0, dim=384, data=b"\0" * 384),
        patterns_pb2.Embedding(
            encoding=patterns_pb2.EMBEDDING_ENCODING_INT8,
            dim=384,
            scale=float("nan"),
            data=b"\1" * 384,
        ),
        patterns_pb2.Embedding(
            encoding=patterns_pb2.EMBEDDING_ENCODING_FLOAT32,
            dim=384,
            data=np.full(384, np.inf, dtype=np.float32).tobytes(),
        ),
    ],
    ids=["wrong-dim", "short-data", "unknown-encoding", "nan-scale", "inf-values"],
)
def test_invalid_embeddings_rejected(bad: patterns_pb2.Embedding) -> None:
    with pytest.raises(EmbeddingError):
        decode_embedding(bad)


def test_nan_input_rejected() -> None:
    v = np.ones(384, dtype=np.float32)
    v[3] = np.nan
    with pytest.raises(EmbeddingError):
        encode_embedding(v)
