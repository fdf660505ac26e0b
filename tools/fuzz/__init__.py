"""A seeded fuzzer for the project's gRPC servers (``make fuzz``, ``python -m tools.fuzz``).

It lists every RPC by server reflection, sends each hostile requests (random bytes, extreme
values in every field, zstd bombs and garbage in every bytes field including the
`PatternDelta` inside ``SyncPatternsRequest.delta``, huge repeated fields, oversized
messages) and checks that nothing answers UNKNOWN or INTERNAL, that health stays SERVING,
that the server's memory stays bounded and that refused requests write nothing. See
`tools.fuzz.runner` for the checks and `tools.fuzz.cases` for the cases.
"""

from tools.fuzz.runner import FuzzConfig, FuzzReport, MetadataHook, run_fuzz
from tools.fuzz.shard import ShardProcess

__all__ = ["FuzzConfig", "FuzzReport", "MetadataHook", "ShardProcess", "run_fuzz"]
