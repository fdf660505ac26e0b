"""Exogenesis Omega wire protocol: generated `omega.v1` messages plus the hand-written codec.

Generated code lives in the `omega.v1` package (``make proto``; never edited). This package adds
the zstd payload codec, embedding quantization and the context buckets shared by the TV brain
and the services.
"""

from omega.v1 import (
    events_pb2,
    federation_pb2,
    federation_pb2_grpc,
    patterns_pb2,
    sync_pb2,
    sync_pb2_grpc,
)
from omega_protocol.codec import (
    DEFAULT_LEVEL,
    DEFAULT_MAX_RAW_BYTES,
    PayloadError,
    decode_payload,
    encode_payload,
)
from omega_protocol.context import (
    BUCKET_COUNT,
    ContextBucket,
    bucket_from_context,
    bucket_from_timestamp,
    pattern_context,
)
from omega_protocol.quantization import (
    EMBEDDING_DIM,
    EmbeddingError,
    decode_embedding,
    decode_embeddings,
    dequantize_int8,
    encode_embedding,
    encode_embeddings,
    quantize_int8,
)
from omega_protocol.sharding import shard_for

__all__ = [
    "BUCKET_COUNT",
    "DEFAULT_LEVEL",
    "DEFAULT_MAX_RAW_BYTES",
    "EMBEDDING_DIM",
    "ContextBucket",
    "EmbeddingError",
    "PayloadError",
    "bucket_from_context",
    "bucket_from_timestamp",
    "decode_embedding",
    "decode_embeddings",
    "decode_payload",
    "dequantize_int8",
    "encode_embedding",
    "encode_embeddings",
    "encode_payload",
    "events_pb2",
    "federation_pb2",
    "federation_pb2_grpc",
    "pattern_context",
    "patterns_pb2",
    "quantize_int8",
    "shard_for",
    "sync_pb2",
    "sync_pb2_grpc",
]
