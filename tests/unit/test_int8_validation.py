"""The shard's INT8 fast path (`embedding_to_int8` on INT8 input, checked on the codes
without decoding them) accepts and refuses exactly what decoding to floats and
`check_unit_norm` do, and returns the codes and scale unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from omega.v1 import patterns_pb2
from omega_common.errors import InvalidArgumentError
from omega_constellation.bounds import check_unit_norm
from omega_constellation.converters import embedding_to_int8
from omega_protocol import EMBEDDING_DIM, EmbeddingError, decode_embedding


def _reference_accepts(e: patterns_pb2.Embedding) -> bool:
    try:
        check_unit_norm(decode_embedding(e, EMBEDDING_DIM), "x")
    except (EmbeddingError, InvalidArgumentError):
        return False
    return True


def _int8(codes: np.ndarray, scale: float, dim: int = EMBEDDING_DIM) -> patterns_pb2.Embedding:
    return patterns_pb2.Embedding(
        encoding=patterns_pb2.EMBEDDING_ENCODING_INT8,
        dim=dim,
        data=codes.astype(np.int8).tobytes(),
        scale=scale,
    )


def _cases() -> list[patterns_pb2.Embedding]:
    rng = np.random.default_rng(11)
    out = []
    for _ in range(300):
        codes = rng.integers(-128, 128, EMBEDDING_DIM)
        unit = 1.0 / float(np.linalg.norm(codes))
        factor = float(rng.choice([1.0, 0.49, 0.51, 1.99, 2.01, 1e-9, 1e30]))
        out.append(_int8(codes, unit * factor))
    codes = rng.integers(-127, 128, EMBEDDING_DIM)
    unit = 1.0 / float(np.linalg.norm(codes))
    out += [
        _int8(np.zeros(EMBEDDING_DIM), 0.01),  # the zero vector
        _int8(np.full(EMBEDDING_DIM, -128), 1.0 / (128 * EMBEDDING_DIM**0.5)),  # -128 codes
        _int8(codes, float("nan")),
        _int8(codes, float("inf")),
        _int8(codes, -unit),
        _int8(codes, 3.4e38),  # overflows float32 when decoded
        _int8(codes, unit, dim=EMBEDDING_DIM - 1),
        _int8(codes[:-1], unit),
        _int8(codes[:-1], unit, dim=EMBEDDING_DIM - 1),
    ]
    return out


@pytest.mark.parametrize("embedding", _cases())
def test_int8_fast_path_matches_decoding(embedding: patterns_pb2.Embedding) -> None:
    accepted = _reference_accepts(embedding)
    if accepted:
        codes, scale = embedding_to_int8(embedding, "x")
        assert codes == embedding.data and scale == embedding.scale
    else:
        with pytest.raises(InvalidArgumentError, match=r"^x: "):
            embedding_to_int8(embedding, "x")
