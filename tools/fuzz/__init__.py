"""A seeded fuzzer for the project's gRPC servers (``make fuzz``, ``python -m tools.fuzz``).

It lists every RPC by server reflection, sends each hostile requests (random bytes, extreme
values in every field, zstd bombs and garbage in every bytes field including the
`PatternDelta` inside ``SyncPatternsRequest.delta``, huge repeated fields, oversized
messages), each with a credential from a seeded mix (none, forged, another device's, the
wrong kind for the listener, and mostly valid ones so that cases reach validation), and
checks that nothing answers UNKNOWN or INTERNAL, that health stays SERVING, that the
server's memory stays bounded and that refused requests write nothing. See
`tools.fuzz.runner` for the checks, `tools.fuzz.cases` for the cases and
`tools.fuzz.credentials` for the credentials.
"""

from tools.fuzz.credentials import Credential, CredentialMix, MetadataHook
from tools.fuzz.runner import FuzzConfig, FuzzReport, run_fuzz
from tools.fuzz.shard import ShardProcess

__all__ = [
    "Credential",
    "CredentialMix",
    "FuzzConfig",
    "FuzzReport",
    "MetadataHook",
    "ShardProcess",
    "run_fuzz",
]
