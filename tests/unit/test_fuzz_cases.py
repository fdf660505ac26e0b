"""The fuzzer's case generation (tools/fuzz): seeded, covering nested payloads, bounded."""

from __future__ import annotations

from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import Message

from omega.v1 import federation_pb2, patterns_pb2, sync_pb2
from omega_protocol import PayloadError, decode_payload
from tools.fuzz.cases import CasePlan
from tools.fuzz.reflection import Rpc
from tools.fuzz.seeds import seed_builders

_SYNC = "/omega.v1.ConstellationSync/SyncPatterns"


def _rpc(path: str, request: type[Message], response: type[Message]) -> Rpc:
    return Rpc("127.0.0.1:1", path, request, response, False, False)


def _plan(seed: int = 0) -> CasePlan:
    rpcs = [
        _rpc(_SYNC, sync_pb2.SyncPatternsRequest, sync_pb2.SyncPatternsResponse),
        _rpc(
            "/omega.v1.Federation/PublishRound",
            federation_pb2.PublishRoundRequest,
            federation_pb2.PublishRoundResponse,
        ),
    ]

    def classes(name: str) -> type[Message]:
        pool = descriptor_pool.Default()
        return message_factory.GetMessageClass(pool.FindMessageTypeByName(name))

    return CasePlan(rpcs, seed_builders(["c0000", "c0001"]), classes, seed, 1 << 20)


def test_cases_depend_only_on_the_seed_and_the_index() -> None:
    first, again, other = _plan(), _plan(), _plan(seed=1)
    for index in (0, 5, len(first.sweep) + 3, 4000):
        assert first.case(index).payload == again.case(index).payload
        assert first.case(index).note == again.case(index).note
    randoms = range(len(first.sweep), len(first.sweep) + 50)
    assert [first.case(i).payload for i in randoms] != [other.case(i).payload for i in randoms]


def test_the_sweep_reaches_every_field_of_the_nested_delta() -> None:
    plan = _plan()
    paths = {s.path for s in plan.slots[0]}
    for path in (
        "local_version",
        "delta.data",
        "delta/local_version",
        "delta/added[0].embedding.scale",
        "delta/content_views[0].views",
        "delta/model_update.model_version",
        "delta/model_update.direction.data",
    ):
        assert path in paths, path
    # A hostile inner value is encoded into a payload the server can decode (it reaches the
    # checks behind the zstd frame), and linked fields move together.
    index = next(
        i
        for i, (r, s, option) in enumerate(plan.sweep)
        if r == 0 and plan.slots[0][s].path == "delta/added[0].embedding.scale" and option == 0
    )
    request = sync_pb2.SyncPatternsRequest.FromString(plan.case(index).payload)
    delta = decode_payload(request.delta, patterns_pb2.PatternDelta)
    assert delta.added[0].embedding.scale != delta.added[0].embedding.scale  # NaN
    linked = next(
        i
        for i, (r, s, option) in enumerate(plan.sweep)
        if r == 0 and plan.slots[0][s].path == "local_version" and option == 0
    )
    request = sync_pb2.SyncPatternsRequest.FromString(plan.case(linked).payload)
    delta = decode_payload(request.delta, patterns_pb2.PatternDelta)
    assert request.local_version == delta.local_version == 2**64 - 1


def test_envelope_garbage_survives_the_re_encoding() -> None:
    plan = _plan()
    index = next(
        i
        for i, (r, s, option) in enumerate(plan.sweep)
        if r == 0 and plan.slots[0][s].path == "delta.data" and option == 0
    )
    request = sync_pb2.SyncPatternsRequest.FromString(plan.case(index).payload)
    try:
        decode_payload(request.delta, patterns_pb2.PatternDelta)
    except PayloadError:
        return
    raise AssertionError("the garbage data was replaced by a valid payload")


def test_cases_stay_bounded_in_size() -> None:
    plan = _plan()
    sizes = [len(plan.case(i).payload) for i in range(len(plan.sweep) + 400)]
    assert max(sizes) < 8 << 20
