"""zstd payload codec: round trips and every refusal."""

from __future__ import annotations

import contextlib

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from omega.v1 import patterns_pb2, sync_pb2
from omega_protocol import PayloadError, decode_payload, encode_payload

views = st.lists(
    st.builds(
        patterns_pb2.ContentViewCount,
        content_id=st.text(min_size=1, max_size=20),
        views=st.integers(0, 2**32 - 1),
    ),
    max_size=30,
)


@given(views=views, version=st.integers(1, 2**63), compress=st.booleans())
@settings(max_examples=150, deadline=None)
def test_round_trip(
    views: list[patterns_pb2.ContentViewCount], version: int, compress: bool
) -> None:
    delta = patterns_pb2.PatternDelta(content_views=views, local_version=version)
    payload = encode_payload(delta, compress=compress)
    assert payload.raw_size == delta.ByteSize()
    assert decode_payload(payload, patterns_pb2.PatternDelta) == delta


@given(data=st.binary(max_size=200))
@settings(max_examples=200, deadline=None)
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    payload = sync_pb2.CompressedPayload(codec=sync_pb2.CODEC_ZSTD, raw_size=len(data), data=data)
    with contextlib.suppress(PayloadError):
        decode_payload(payload, patterns_pb2.PatternDelta)


def test_declared_size_over_limit() -> None:
    payload = encode_payload(patterns_pb2.PatternDelta(local_version=1))
    payload.raw_size = 10_000
    with pytest.raises(PayloadError, match="declared raw size"):
        decode_payload(payload, patterns_pb2.PatternDelta, max_raw_bytes=1000)


@pytest.mark.parametrize("content_size", [True, False])
def test_zstd_bomb_refused(content_size: bool) -> None:
    bomb = zstandard.ZstdCompressor(write_content_size=content_size).compress(b"\0" * (4 << 20))
    assert len(bomb) < 1000
    payload = sync_pb2.CompressedPayload(codec=sync_pb2.CODEC_ZSTD, raw_size=100, data=bomb)
    with pytest.raises(PayloadError, match="limit"):
        decode_payload(payload, patterns_pb2.PatternDelta, max_raw_bytes=64 * 1024)


def test_raw_size_mismatch() -> None:
    payload = encode_payload(patterns_pb2.PatternDelta(local_version=7))
    payload.raw_size += 1
    with pytest.raises(PayloadError, match="raw_size"):
        decode_payload(payload, patterns_pb2.PatternDelta)


@pytest.mark.parametrize(
    ("codec", "dictionary"), [(sync_pb2.CODEC_UNSPECIFIED, 0), (99, 0), (sync_pb2.CODEC_ZSTD, 3)]
)
def test_unknown_codec_or_dictionary(codec: int, dictionary: int) -> None:
    payload = sync_pb2.CompressedPayload(codec=codec, dictionary_id=dictionary, data=b"")
    with pytest.raises(PayloadError, match="unknown"):
        decode_payload(payload, patterns_pb2.PatternDelta)


def test_not_a_protobuf() -> None:
    payload = sync_pb2.CompressedPayload(
        codec=sync_pb2.CODEC_NONE, raw_size=3, data=b"\xff\xff\xff"
    )
    with pytest.raises(PayloadError, match="not a valid"):
        decode_payload(payload, patterns_pb2.PatternDelta)
