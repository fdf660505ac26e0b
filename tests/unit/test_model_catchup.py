"""Which shards the worker catches up: read from their PublishRound answers (no I/O here; the
catch-up itself runs against real shards in tests/integration/test_model_catchup.py)."""

from __future__ import annotations

from omega.v1 import federation_pb2
from omega_federation.model_catchup import CatchUpReport, catch_up_models, shard_model_versions
from omega_federation.settings import FederationSettings


def test_a_shard_older_than_the_field_is_left_out_and_zero_is_a_version() -> None:
    answers = {
        "old": federation_pb2.PublishRoundResponse(global_version=7),  # field unset
        "new": federation_pb2.PublishRoundResponse(global_version=7, model_version=0),
        "current": federation_pb2.PublishRoundResponse(global_version=7, model_version=5),
    }
    assert shard_model_versions(answers) == {"new": 0, "current": 5}
    # The field survives the wire: set to 0 is not the same as unset.
    echoed = federation_pb2.PublishRoundResponse.FromString(answers["new"].SerializeToString())
    assert echoed.HasField("model_version")


async def test_nothing_to_do_without_a_model_or_a_shard_behind() -> None:
    settings = FederationSettings(plaintext=True)
    # No channel is touched when no shard is behind (or there is no model yet).
    assert await catch_up_models({}, {"a": 3, "b": 3}, 3, settings) == CatchUpReport(3)
    assert await catch_up_models({}, {"a": 0}, 0, settings) == CatchUpReport(0)
    assert CatchUpReport(3, sent=["b"]).figures() == {
        "model_snapshots_sent": 1,
        "model_snapshots_failed": 0,
        "model_snapshot_shards": ["b"],
    }
