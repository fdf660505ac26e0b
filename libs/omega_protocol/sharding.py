"""Which shard a device belongs to: rendezvous (highest-random-weight) hashing.

Thaler & Ravishankar, "Using name-based mappings to increase hit rates" (1998). Every device
scores every shard with a stable 64-bit hash of ``(shard_id, device_id)`` and belongs to the
highest score; adding or removing a shard moves only the devices of that shard. The same
function runs on the device and on the server, so a replica can tell a device it came to the
wrong shard and name the right one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

__all__ = ["shard_for"]


def _score(shard_id: str, device_id: str) -> int:
    digest = hashlib.blake2b(
        f"{shard_id}\x00{device_id}".encode(), digest_size=8, person=b"omega-shard"
    ).digest()
    return int.from_bytes(digest, "big")


def shard_for(device_id: str, shard_ids: Sequence[str]) -> str:
    """The shard id ``device_id`` belongs to.

    Args:
        device_id: the device's stable id.
        shard_ids: every shard id of the shard map (order does not matter).

    Raises:
        ValueError: when ``shard_ids`` is empty.
    """
    if not shard_ids:
        raise ValueError("the shard map is empty")
    return max(shard_ids, key=lambda shard: (_score(shard, device_id), shard))
