"""The fuzzer's case generation (tools/fuzz): seeded, covering nested payloads, bounded; and
the credentials its cases carry."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import Message

from omega.v1 import federation_pb2, patterns_pb2, sync_pb2
from omega_common.auth import AuthenticationError, FleetKeys
from omega_protocol import PayloadError, decode_payload
from tools.fuzz.cases import CasePlan
from tools.fuzz.credentials import CredentialMix
from tools.fuzz.reflection import Rpc
from tools.fuzz.seeds import seed_builders

_SYNC = "/omega.v1.ConstellationSync/SyncPatterns"
_PUBLISH = "/omega.v1.Federation/PublishRound"
_DEVICE, _INTERNAL = "127.0.0.1:1", "127.0.0.1:2"
_KEYS = FleetKeys({"k1": b"k" * 32}, "k1")


def _rpc(path: str, request: type[Message], response: type[Message], target: str = _DEVICE) -> Rpc:
    also = (_INTERNAL,) if target == _DEVICE else ()
    return Rpc(target, path, request, response, False, False, also)


def _plan(seed: int = 0, internal_limit: int | None = None) -> CasePlan:
    rpcs = [
        _rpc(_SYNC, sync_pb2.SyncPatternsRequest, sync_pb2.SyncPatternsResponse),
        _rpc(
            _PUBLISH,
            federation_pb2.PublishRoundRequest,
            federation_pb2.PublishRoundResponse,
            _INTERNAL,
        ),
    ]

    def classes(name: str) -> type[Message]:
        pool = descriptor_pool.Default()
        return message_factory.GetMessageClass(pool.FindMessageTypeByName(name))

    limits = {_INTERNAL: internal_limit} if internal_limit is not None else None
    return CasePlan(rpcs, seed_builders(["c0000", "c0001"]), classes, seed, 1 << 20, limits)


def _token(metadata: tuple[tuple[str, str], ...]) -> str:
    ((key, value),) = metadata
    assert key == "authorization" and value.startswith("Bearer ")
    return value.removeprefix("Bearer ")


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


def test_oversize_cases_exceed_the_limit_of_their_own_listener() -> None:
    plan = _plan(internal_limit=6 << 20)  # 64 MiB on a shard; smaller here, for speed
    sizes: dict[str, list[int]] = {_SYNC: [], _PUBLISH: []}
    for index in range(len(plan.sweep), len(plan.sweep) + 1500):
        case = plan.case(index)
        if case.kind == "oversize":
            sizes[case.rpc.path].append(len(case.payload))
    assert sizes[_SYNC] and sizes[_PUBLISH]
    assert all((1 << 20) < n < (5 << 20) for n in sizes[_SYNC])
    assert all((6 << 20) < n < (10 << 20) for n in sizes[_PUBLISH])


def test_credentials_depend_only_on_the_seed_and_the_index() -> None:
    plan = _plan()
    first, again = CredentialMix(_KEYS, 0, [_INTERNAL]), CredentialMix(_KEYS, 0, [_INTERNAL])
    other = CredentialMix(_KEYS, 1, [_INTERNAL])
    cases = [plan.case(i) for i in range(len(plan.sweep), len(plan.sweep) + 200)]
    assert [first(c.rpc.path, c) for c in cases] == [again(c.rpc.path, c) for c in cases]
    assert [first(c.rpc.path, c).kind for c in cases] != [other(c.rpc.path, c).kind for c in cases]


def test_the_credential_mix_reaches_validation_and_every_refusal() -> None:
    plan = _plan()
    mix = CredentialMix(_KEYS, 0, [_INTERNAL])
    kinds: Counter[tuple[str, str]] = Counter()
    for index in range(len(plan.sweep), len(plan.sweep) + 1500):
        case = plan.case(index)
        credential = mix(case.rpc.path, case)
        kinds[case.rpc.path, credential.kind] += 1
        target = credential.target or case.rpc.target
        assert target == (_INTERNAL if credential.kind.endswith("@internal") else _DEVICE)
        if credential.kind in ("device@device", "device@internal") and case.kind == "mutate":
            request = case.rpc.request.FromString(case.payload)
            subject = _KEYS.verify(_token(credential.metadata)).device_id
            if "device_id" in request.DESCRIPTOR.fields_by_name:
                device = request.device_id  # type: ignore[attr-defined]
                if device and len(device.encode()) <= 256 and device.isprintable():
                    assert subject == device  # a token for the request's own device
            else:
                assert subject == "fuzz-device"
        if credential.kind == "service@internal":
            subject = _KEYS.verify(_token(credential.metadata)).device_id
            assert subject == "service:federation-worker"
        expected = {
            "none": {"UNAUTHENTICATED"},
            "forged": {"UNAUTHENTICATED"},
            "intruder": {"PERMISSION_DENIED"},
            "service": {"PERMISSION_DENIED"} if credential.kind == "service@device" else set(),
            "device": {"PERMISSION_DENIED"} if credential.kind == "device@internal" else set(),
        }.get(credential.kind.split("@")[0])
        if expected is not None:
            assert credential.expect == expected, credential
        if credential.kind.startswith("forged@"):
            values = [v for _, v in credential.metadata]
            if len(values) == 1 and values[0].startswith("Bearer "):
                try:
                    _KEYS.verify(values[0].removeprefix("Bearer "))
                except AuthenticationError:
                    continue
                raise AssertionError(f"a forged credential verifies: {values[0]}")
    sync = {k for p, k in kinds if p == _SYNC}
    publish = {k for p, k in kinds if p == _PUBLISH}
    assert sync == {
        "device@device",
        "other-device@device",
        "none@device",
        "forged@device",
        "service@device",
        "service@internal",
        "device@internal",
    }
    assert publish == {
        "service@internal",
        "device@internal",
        "intruder@internal",
        "none@internal",
        "forged@internal",
    }
    # About half of the random cases carry the valid credential of their listener.
    total = sum(n for (p, _), n in kinds.items() if p == _SYNC)
    assert 0.4 < kinds[_SYNC, "device@device"] / total < 0.6
    # The sweep mostly does, so that its hostile values reach validation.
    sweep = [mix(c.rpc.path, c).kind for c in map(plan.case, range(len(plan.sweep)))]
    assert sum(k in ("device@device", "service@internal") for k in sweep) > 0.75 * len(sweep)
    # The fuzzer's own calls: a device token, none for health and reflection.
    assert mix(_SYNC, None).kind == "fuzzer" and mix(_SYNC, None).metadata
    assert mix("/grpc.health.v1.Health/Check", None).metadata == ()
    health = _rpc("/grpc.health.v1.Health/Check", Message, Message)
    case = plan.case(len(plan.sweep))
    assert mix(health.path, replace(case, rpc=health)).expect == frozenset()  # open to all
