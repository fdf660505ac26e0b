"""The collaborative model through a constellation shard: real gRPC, real Postgres.

Devices push `ItemFactorUpdate`s inside their deltas, the worker exports them and publishes item
factors, devices fetch the rows that changed (FetchModel).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import asyncpg
import grpc
import numpy as np
import pytest

from omega.v1 import federation_pb2, federation_pb2_grpc, patterns_pb2, sync_pb2, sync_pb2_grpc
from omega_constellation.server import RunningServer
from omega_constellation.store import device_key
from omega_protocol import decode_embedding, encode_embedding, encode_payload
from omega_protocol.model_update import encode_item_factor_update

from .conftest import StartShard
from .test_constellation import count_rows, pattern

pytestmark = pytest.mark.integration

FACTORS = 4


@pytest.fixture
async def federation(shard: RunningServer) -> AsyncIterator[federation_pb2_grpc.FederationStub]:
    """A Federation client connected to ``shard``."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{shard.federation_port}") as channel:
        yield federation_pb2_grpc.FederationStub(channel)


def update(
    ids: Sequence[str] = ("c0001", "c0002"),
    model_version: int = 0,
    direction: Sequence[float] | None = None,
) -> patterns_pb2.ItemFactorUpdate:
    weights = np.full(len(ids), 1.0 / np.sqrt(len(ids)), dtype=np.float32)
    return encode_item_factor_update(model_version, ids, weights, direction)


def sync_request(
    device: str,
    version: int,
    model_update: patterns_pb2.ItemFactorUpdate | None = None,
    *patterns: patterns_pb2.ViewingPattern,
) -> sync_pb2.SyncPatternsRequest:
    delta = patterns_pb2.PatternDelta(
        added=list(patterns),
        local_version=version,
        base_version=version - 1,
        content_views=[patterns_pb2.ContentViewCount(content_id="c0003", views=1)],
    )
    if model_update is not None:
        delta.model_update.CopyFrom(model_update)
    return sync_pb2.SyncPatternsRequest(
        device_id=device, local_version=version, delta=encode_payload(delta)
    )


def factors_of(seed: int, ids: Sequence[str], factors: int = FACTORS) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {c: rng.standard_normal(factors).astype(np.float32) for c in ids}


def publish_request(
    round_id: int,
    rows: dict[str, np.ndarray | None],
    factors: int = FACTORS,
) -> federation_pb2.PublishRoundRequest:
    item_factors = []
    for cid, vector in rows.items():
        row = patterns_pb2.ItemFactorRow(content_id=cid)
        if vector is not None:
            row.factor.CopyFrom(encode_embedding(vector))
        item_factors.append(row)
    return federation_pb2.PublishRoundRequest(
        round=round_id, item_factors=item_factors, factors=factors, noise_multiplier=0.5
    )


async def fetch_all(
    stub: sync_pb2_grpc.ConstellationSyncStub, since: int, page_size: int = 0
) -> tuple[list[sync_pb2.FetchModelResponse], list[patterns_pb2.ItemFactorRow]]:
    pages: list[sync_pb2.FetchModelResponse] = []
    token = ""
    while True:
        page = await stub.FetchModel(
            sync_pb2.FetchModelRequest(
                since_model_version=since, page_size=page_size, page_token=token
            )
        )
        pages.append(page)
        token = page.next_page_token
        if not token:
            return pages, [row for p in pages for row in p.rows]


async def fetch_rows(dsn: str, query: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(query))
    finally:
        await conn.close()


async def test_sync_with_model_update_is_stored_once(
    stub: sync_pb2_grpc.ConstellationSyncStub, database_url: str
) -> None:
    first_update = update(("c0001", "c0002"))
    request = sync_request("tv-1", 1, first_update, pattern("p1"))
    first = await stub.SyncPatterns(request)
    again = await stub.SyncPatterns(request)
    assert not first.duplicate and again.duplicate
    assert first.model_version == 0 and again.model_version == 0
    rows = await fetch_rows(database_url, "SELECT * FROM model_updates")
    assert len(rows) == 1 and rows[0]["device_id"] == "tv-1" and rows[0]["model_version"] == 0
    assert patterns_pb2.ItemFactorUpdate.FromString(rows[0]["payload"]) == first_update
    stored_at = rows[0]["stored_at_ms"]
    # The duplicate applied nothing: neither the update nor the view counts again.
    (views,) = await fetch_rows(database_url, "SELECT views FROM content_views")
    assert views["views"] == 1

    # A newer sync without an update keeps the stored one; one with an update replaces it.
    await stub.SyncPatterns(sync_request("tv-1", 2))
    rows = await fetch_rows(database_url, "SELECT payload, stored_at_ms FROM model_updates")
    assert len(rows) == 1 and rows[0]["stored_at_ms"] == stored_at
    latest = update(("c0007",))
    await stub.SyncPatterns(sync_request("tv-1", 3, latest))
    rows = await fetch_rows(database_url, "SELECT payload FROM model_updates")
    assert [patterns_pb2.ItemFactorUpdate.FromString(r["payload"]) for r in rows] == [latest]


def _raw_update(
    ids: Sequence[str],
    weights: Sequence[float],
    model_version: int = 0,
    direction: Sequence[float] | None = None,
) -> patterns_pb2.ItemFactorUpdate:
    """An update built without the encoder's checks (to send malformed ones)."""
    message = patterns_pb2.ItemFactorUpdate(model_version=model_version, content_ids=list(ids))
    message.weights.CopyFrom(encode_embedding(np.asarray(weights, dtype=np.float32)))
    if direction is not None:
        message.direction.CopyFrom(encode_embedding(np.asarray(direction, dtype=np.float32)))
    return message


MALFORMED_UPDATES = {
    "repeated content id": _raw_update(["c0001", "c0001"], [0.5, 0.5]),
    "weights norm above 1": _raw_update(["c0001", "c0002"], [0.9, 0.9]),
    "negative weight": _raw_update(["c0001", "c0002"], [0.5, -0.5]),
    "weights of another dimension": _raw_update(["c0001", "c0002"], [0.5, 0.5, 0.5]),
    "unknown content id": _raw_update(["c0001", "not-in-catalog"], [0.5, 0.5]),
    "no content id": patterns_pb2.ItemFactorUpdate(),
    "direction without model version": _raw_update(["c0001"], [1.0], 0, [0.1] * FACTORS),
    "direction of the wrong dimension": _raw_update(["c0001"], [1.0], 1, [0.1] * (FACTORS - 1)),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_UPDATES))
async def test_malformed_model_update_is_rejected_and_nothing_written(
    case: str,
    stub: sync_pb2_grpc.ConstellationSyncStub,
    federation: federation_pb2_grpc.FederationStub,
    database_url: str,
) -> None:
    # Model version 1 with FACTORS factors, so a direction against version 1 must have them.
    await federation.PublishRound(publish_request(1, factors_of(1, ["c0001", "c0002"])))
    request = sync_request("tv-bad", 1, MALFORMED_UPDATES[case], pattern("p-ok"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.SyncPatterns(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert "model_update" in (err.value.details() or "")
    for table in ("devices", "device_patterns", "content_views", "model_updates"):
        assert await count_rows(database_url, table) == 0, table


async def test_direction_against_an_older_model_is_stored(
    stub: sync_pb2_grpc.ConstellationSyncStub,
    federation: federation_pb2_grpc.FederationStub,
    database_url: str,
) -> None:
    """Only a direction for the current version must match its factor count; the worker
    decides what older ones are worth."""
    await federation.PublishRound(publish_request(1, factors_of(1, ["c0001"])))
    await federation.PublishRound(publish_request(2, factors_of(2, ["c0001"], 6), factors=6))
    response = await stub.SyncPatterns(sync_request("tv-1", 1, update(("c0001",), 1, [0.2] * 4)))
    assert response.model_version == 2
    rows = await fetch_rows(database_url, "SELECT model_version FROM model_updates")
    assert [r["model_version"] for r in rows] == [1]


async def test_export_streams_model_updates_with_device_keys_in_batches(
    stub: sync_pb2_grpc.ConstellationSyncStub,
    federation: federation_pb2_grpc.FederationStub,
) -> None:
    sent = {f"tv-{i}": update((f"c{i:04d}", f"c{i + 10:04d}")) for i in range(5)}
    for i, (device, model_update) in enumerate(sent.items()):
        await stub.SyncPatterns(sync_request(device, 1, model_update, pattern(f"p{i}", seed=i)))
    await stub.SyncPatterns(sync_request("tv-no-update", 1, None, pattern("p-x")))

    batches = [
        b
        async for b in federation.ExportPatterns(
            federation_pb2.ExportPatternsRequest(batch_size=2, min_success_rate=0.8)
        )
    ]
    pattern_batches = [b for b in batches if b.patterns]
    update_batches = [b for b in batches if b.model_updates]
    assert sum(len(b.patterns) for b in pattern_batches) == 6
    # Patterns first, then model updates, never both in one message, at most batch_size each.
    assert batches.index(update_batches[0]) > batches.index(pattern_batches[-1])
    assert not any(b.patterns and b.model_updates for b in batches)
    assert [len(b.model_updates) for b in update_batches] == [2, 2, 1]
    # View counts only on the last message; every message names the shard.
    assert [bool(b.content_views) for b in batches] == [False] * (len(batches) - 1) + [True]
    assert all(b.shard_id == "shard-0" for b in batches)
    assert batches[-1].watermark_ms == pattern_batches[-1].watermark_ms
    exported = {u.device_key: u.update for b in update_batches for u in b.model_updates}
    assert exported == {device_key(d): u for d, u in sent.items()}
    assert not set(exported) & set(sent)  # keys, never device ids


def _assert_rows_match(
    rows: Sequence[patterns_pb2.ItemFactorRow],
    expected: dict[str, np.ndarray | None],
    version: dict[str, int],
) -> None:
    assert [r.content_id for r in rows] == sorted(expected)
    for row in rows:
        want = expected[row.content_id]
        assert row.model_version == version[row.content_id]
        if want is None:
            assert not row.HasField("factor")
            continue
        assert row.factor.encoding == patterns_pb2.EMBEDDING_ENCODING_INT8
        got = decode_embedding(row.factor, FACTORS)
        step = float(np.max(np.abs(want))) / 127.0
        np.testing.assert_allclose(got, want, atol=step / 2 + 1e-6)


async def test_published_factors_are_fetched_and_only_changed_rows_since_a_version(
    stub: sync_pb2_grpc.ConstellationSyncStub,
    federation: federation_pb2_grpc.FederationStub,
    database_url: str,
) -> None:
    ids = [f"c{i:04d}" for i in range(8)]
    first: dict[str, np.ndarray | None] = dict(factors_of(1, ids))
    published = await federation.PublishRound(publish_request(3, first))
    assert published.global_version == 3 and not published.duplicate

    pages, rows = await fetch_all(stub, since=0)
    assert len(pages) == 1 and pages[0].model_version == 3 and pages[0].factors == FACTORS
    _assert_rows_match(rows, first, dict.fromkeys(ids, 3))

    # Round 4 changes two rows and removes one (the item left the model).
    changed: dict[str, np.ndarray | None] = {"c0002": np.ones(FACTORS, np.float32), "c0005": None}
    changed.update(factors_of(2, ["c0006"]))
    await federation.PublishRound(publish_request(4, changed))
    pages, rows = await fetch_all(stub, since=3)
    assert {p.model_version for p in pages} == {4}
    _assert_rows_match(rows, changed, dict.fromkeys(changed, 4))
    # The whole model at version 4, and nothing newer than 4.
    _, rows = await fetch_all(stub, since=0)
    _assert_rows_match(rows, first | changed, {c: 4 if c in changed else 3 for c in ids})
    pages, rows = await fetch_all(stub, since=4)
    assert rows == [] and pages[0].model_version == 4
    (audit,) = await fetch_rows(
        database_url,
        "SELECT model_rows, model_factors, noise_multiplier FROM published_rounds WHERE round = 4",
    )
    assert tuple(audit) == (3, FACTORS, 0.5)


async def test_round_without_item_factors_leaves_the_model_untouched(
    stub: sync_pb2_grpc.ConstellationSyncStub,
    federation: federation_pb2_grpc.FederationStub,
) -> None:
    await federation.PublishRound(publish_request(1, factors_of(1, ["c0001", "c0002"])))
    await stub.SyncPatterns(sync_request("tv-1", 1, update(("c0001",), 1, [0.1] * FACTORS)))
    await federation.PublishRound(federation_pb2.PublishRoundRequest(round=2))
    pages, rows = await fetch_all(stub, since=0)
    assert pages[0].model_version == 1 and len(rows) == 2
    response = await stub.SyncPatterns(sync_request("tv-1", 2))
    assert response.global_version == 2 and response.model_version == 1
    # A replayed round is a no-op for the model too.
    again = await federation.PublishRound(publish_request(1, factors_of(9, ["c0003"])))
    assert again.duplicate
    _, rows = await fetch_all(stub, since=0)
    assert [r.content_id for r in rows] == ["c0001", "c0002"]


async def test_fetch_model_pages_one_row_at_a_time(
    stub: sync_pb2_grpc.ConstellationSyncStub,
    federation: federation_pb2_grpc.FederationStub,
) -> None:
    ids = [f"c{i:04d}" for i in range(0, 20, 3)]
    expected: dict[str, np.ndarray | None] = dict(factors_of(5, ids))
    await federation.PublishRound(publish_request(1, expected))
    pages, rows = await fetch_all(stub, since=0, page_size=1)
    assert len(pages) == len(ids) and all(len(p.rows) == 1 for p in pages)
    assert all(p.next_page_token for p in pages[:-1]) and not pages[-1].next_page_token
    _assert_rows_match(rows, expected, dict.fromkeys(ids, 1))
    # Pages of changed rows only: round 2 changes two rows far apart.
    changed: dict[str, np.ndarray | None] = dict(factors_of(6, [ids[1], ids[-1]]))
    await federation.PublishRound(publish_request(2, changed))
    pages, rows = await fetch_all(stub, since=1, page_size=1)
    assert len(pages) == 2
    _assert_rows_match(rows, changed, dict.fromkeys(changed, 2))


async def test_fetch_straddling_a_publish_is_aborted(
    stub: sync_pb2_grpc.ConstellationSyncStub,
    federation: federation_pb2_grpc.FederationStub,
) -> None:
    await federation.PublishRound(publish_request(1, factors_of(1, ["c0001", "c0002", "c0003"])))
    first = await stub.FetchModel(sync_pb2.FetchModelRequest(page_size=1))
    assert first.next_page_token
    await federation.PublishRound(publish_request(2, factors_of(2, ["c0002"])))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.FetchModel(
            sync_pb2.FetchModelRequest(page_size=1, page_token=first.next_page_token)
        )
    assert err.value.code() == grpc.StatusCode.ABORTED
    # Restarting from the first page works, at the new version.
    pages, rows = await fetch_all(stub, since=0, page_size=1)
    assert {p.model_version for p in pages} == {2} and len(rows) == 3

    token = pages[0].next_page_token
    for bad in (
        sync_pb2.FetchModelRequest(page_token="not a token"),
        sync_pb2.FetchModelRequest(page_token="%%%"),
        sync_pb2.FetchModelRequest(since_model_version=1, page_token=token),  # another since
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.FetchModel(bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_fetch_model_before_any_model(stub: sync_pb2_grpc.ConstellationSyncStub) -> None:
    page = await stub.FetchModel(sync_pb2.FetchModelRequest())
    assert page.model_version == 0 and page.factors == 0
    assert not page.rows and not page.next_page_token


async def test_sync_answer_names_the_model_version(
    stub: sync_pb2_grpc.ConstellationSyncStub,
    federation: federation_pb2_grpc.FederationStub,
) -> None:
    await federation.PublishRound(publish_request(7, factors_of(1, ["c0001"])))
    request = sync_request("tv-1", 1, update(("c0001",), 7, [0.5] * FACTORS))
    first = await stub.SyncPatterns(request)
    again = await stub.SyncPatterns(request)
    assert (first.model_version, again.model_version) == (7, 7)
    assert again.duplicate


async def test_publish_deletes_consumed_model_updates(
    stub: sync_pb2_grpc.ConstellationSyncStub,
    federation: federation_pb2_grpc.FederationStub,
    database_url: str,
) -> None:
    await stub.SyncPatterns(sync_request("tv-a", 1, update(("c0001",))))  # against no model
    await federation.PublishRound(publish_request(1, factors_of(1, ["c0001"])))
    assert await count_rows(database_url, "model_updates") == 0
    await stub.SyncPatterns(sync_request("tv-b", 1, update(("c0001",), 1, [0.1] * FACTORS)))
    await stub.SyncPatterns(sync_request("tv-c", 1, update(("c0002",))))
    await federation.PublishRound(federation_pb2.PublishRoundRequest(round=2))  # no model
    assert await count_rows(database_url, "model_updates") == 2
    await federation.PublishRound(publish_request(3, factors_of(3, ["c0001"])))
    assert await count_rows(database_url, "model_updates") == 0
    await stub.SyncPatterns(sync_request("tv-b", 2, update(("c0001",), 3, [0.1] * FACTORS)))
    rows = await fetch_rows(database_url, "SELECT device_id, model_version FROM model_updates")
    assert [tuple(r) for r in rows] == [("tv-b", 3)]


def _bad_rows() -> dict[str, federation_pb2.PublishRoundRequest]:
    ok = factors_of(1, ["c0001"])
    nan = publish_request(1, ok)
    nan.item_factors[0].factor.CopyFrom(
        patterns_pb2.Embedding(
            encoding=patterns_pb2.EMBEDDING_ENCODING_FLOAT32,
            dim=FACTORS,
            data=np.array([np.nan] * FACTORS, dtype=np.float32).tobytes(),
        )
    )
    repeated = publish_request(1, ok)
    repeated.item_factors.append(repeated.item_factors[0])
    return {
        "factor of another dimension": publish_request(1, ok | {"c0002": np.ones(3)}),
        "factors 0": publish_request(1, ok, factors=0),
        "factors above 256": publish_request(1, {"c0001": np.ones(257)}, factors=257),
        "NaN factor": nan,
        "repeated content id": repeated,
        "empty content id": publish_request(1, {"": np.ones(FACTORS)}),
        "NUL in content id": publish_request(1, {"c\x00": np.ones(FACTORS)}),
        "content id too long": publish_request(1, {"c" * 257: np.ones(FACTORS)}),
    }


@pytest.mark.parametrize("case", sorted(_bad_rows()))
async def test_publish_with_bad_item_factors_is_rejected(
    case: str, federation: federation_pb2_grpc.FederationStub, database_url: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await federation.PublishRound(_bad_rows()[case])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for table in ("published_rounds", "item_factors"):
        assert await count_rows(database_url, table) == 0, table


async def test_publish_accepts_ids_outside_the_catalog_and_float_factors(
    stub: sync_pb2_grpc.ConstellationSyncStub, federation: federation_pb2_grpc.FederationStub
) -> None:
    request = publish_request(1, {"elsewhere:42": np.arange(FACTORS, dtype=np.float32)})
    request.item_factors[0].factor.CopyFrom(
        encode_embedding(np.arange(FACTORS), patterns_pb2.EMBEDDING_ENCODING_FLOAT16)
    )
    await federation.PublishRound(request)
    _, rows = await fetch_all(stub, since=0)
    _assert_rows_match(
        rows, {"elsewhere:42": np.arange(FACTORS, dtype=np.float32)}, {"elsewhere:42": 1}
    )


async def test_factor_count_change_removes_rows_the_round_did_not_carry(
    stub: sync_pb2_grpc.ConstellationSyncStub, federation: federation_pb2_grpc.FederationStub
) -> None:
    await federation.PublishRound(publish_request(1, factors_of(1, ["c0001", "c0002"])))
    request = publish_request(2, {}, factors=6)
    request.item_factors.append(
        patterns_pb2.ItemFactorRow(content_id="c0001", factor=encode_embedding(np.ones(6)))
    )
    await federation.PublishRound(request)
    pages, rows = await fetch_all(stub, since=1)
    assert pages[0].factors == 6
    assert [(r.content_id, r.HasField("factor"), r.factor.dim) for r in rows] == [
        ("c0001", True, 6),
        ("c0002", False, 0),
    ]


async def test_replica_that_missed_the_publish_serves_the_new_model(
    start_shard: StartShard, shard: RunningServer, database_url: str
) -> None:
    other = await start_shard(database_url=database_url)
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{shard.federation_port}") as to_first,
        grpc.aio.insecure_channel(f"127.0.0.1:{other.port}") as to_other,
    ):
        await federation_pb2_grpc.FederationStub(to_first).PublishRound(
            publish_request(5, factors_of(1, ["c0001"]))
        )
        other_stub = sync_pb2_grpc.ConstellationSyncStub(to_other)
        _, rows = await fetch_all(other_stub, since=0)
        assert [r.model_version for r in rows] == [5]
        # Its sync validation now knows the model's factor count too.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await other_stub.SyncPatterns(
                sync_request("tv-1", 1, update(("c0001",), 5, [0.1] * (FACTORS + 1)))
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
