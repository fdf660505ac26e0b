"""The shard's item-factor model in memory, paged for FetchModel.

A `ModelView` is an immutable snapshot of ``item_factors`` at one model version; the service
swaps in a new one when it sees a newer version (see `ConstellationService.refresh_model`).

Paging: rows changed after ``since`` come in content id order. A page token names the model
version, ``since`` and the last content id sent, so the next page resumes after that id. When
the model changed between two pages (a round was published in the middle of a fetch), the
token's version is no longer current and the page fails with ABORTED (`ModelChangedError`):
the client restarts the fetch from the first page with the same ``since``, so it never mixes
rows of two versions. ABORTED rather than FAILED_PRECONDITION because retrying the whole
sequence is exactly what fixes it (gRPC status code guide: concurrency conflicts).
"""

from __future__ import annotations

import base64
import binascii
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import grpc
import numpy as np
import numpy.typing as npt

from omega_common.errors import InvalidArgumentError, OmegaError
from omega_constellation.converters import ItemFactorRecord, ModelState

__all__ = ["MAX_MODEL_PAGE", "ModelChangedError", "ModelPage", "ModelView"]

MAX_MODEL_PAGE: Final[int] = 2000
"""Most rows one FetchModel page carries, whatever the client asks."""
DEFAULT_MODEL_PAGE: Final[int] = 1000
"""Rows per page when the client does not say."""
_CACHED_SINCE: Final[int] = 16
"""How many ``since`` values keep their changed-row positions cached per view."""


class ModelChangedError(OmegaError):
    """A paged fetch straddles a model publication: restart it from the first page."""

    code = grpc.StatusCode.ABORTED


@dataclass(frozen=True, slots=True)
class ModelPage:
    """One page of a model fetch.

    Attributes:
        version: The model version of every row of the fetch.
        factors: Factors per item.
        rows: Rows changed after the requested version, in content id order.
        next_token: Token of the next page; empty on the last page.
    """

    version: int
    factors: int
    rows: list[ItemFactorRecord]
    next_token: str


def _encode_token(version: int, since: int, last_id: str) -> str:
    raw = f"{version}.{since}.{last_id}".encode()
    return base64.urlsafe_b64encode(raw).decode("ascii")


def _decode_token(token: str) -> tuple[int, int, str]:
    """(model version, since, last content id) of a token this server issued.

    Raises:
        InvalidArgumentError: the token is not one of ours.
    """
    try:
        raw = base64.urlsafe_b64decode(token.encode("ascii")).decode()
        version, since, last_id = raw.split(".", 2)
        parsed = int(version), int(since), last_id
    except (ValueError, UnicodeError, binascii.Error) as exc:
        raise InvalidArgumentError("page_token is not one this server issued") from exc
    if parsed[0] < 0 or parsed[1] < 0 or not last_id:
        raise InvalidArgumentError("page_token is not one this server issued")
    return parsed


class ModelView:
    """Immutable snapshot of the item-factor model.

    Args:
        state: The model version (0: no model yet) and its factor count.
        rows: Every row of ``item_factors`` (any order).
    """

    def __init__(self, state: ModelState, rows: Sequence[ItemFactorRecord]) -> None:
        self.state = state
        self.rows = sorted(rows, key=lambda r: r.content_id)
        self._ids = [r.content_id for r in self.rows]
        self._versions: npt.NDArray[np.int64] = np.fromiter(
            (r.model_version for r in self.rows), dtype=np.int64, count=len(self.rows)
        )
        self._changed: dict[int, npt.NDArray[np.intp]] = {}

    @property
    def version(self) -> int:
        """The model version (0 before the first model)."""
        return self.state.version

    def __len__(self) -> int:
        return len(self.rows)

    def _changed_since(self, since: int) -> npt.NDArray[np.intp]:
        """Positions (into ``rows``) of the rows changed after ``since``, ascending."""
        positions = self._changed.get(since)
        if positions is None:
            positions = np.flatnonzero(self._versions > since)
            if len(self._changed) >= _CACHED_SINCE:
                self._changed.clear()
            self._changed[since] = positions
        return positions

    def page(self, *, since: int, page_token: str, page_size: int) -> ModelPage:
        """The rows changed after model version ``since``, one page at a time.

        Args:
            since: The client's model version (0: the whole model). A version at or above the
                current one gets no rows.
            page_token: Empty for the first page, else the previous page's ``next_token``.
            page_size: Rows wanted (0: the default); capped at `MAX_MODEL_PAGE`.

        Returns:
            The page.

        Raises:
            InvalidArgumentError: a token this server did not issue or one for another
                ``since``.
            ModelChangedError: the model changed since the fetch's first page.
        """
        limit = min(page_size or DEFAULT_MODEL_PAGE, MAX_MODEL_PAGE)
        positions = self._changed_since(since)
        start = 0
        if page_token:
            version, token_since, last_id = _decode_token(page_token)
            if token_since != since:
                raise InvalidArgumentError("page_token belongs to a fetch with another since")
            if version != self.version:
                raise ModelChangedError(
                    f"the model changed from version {version} to {self.version} during "
                    "this fetch; restart it from the first page"
                )
            start = int(np.searchsorted(positions, bisect_right(self._ids, last_id)))
        chosen = positions[start : start + limit]
        rows = [self.rows[int(i)] for i in chosen]
        more = start + limit < len(positions)
        token = _encode_token(self.version, since, rows[-1].content_id) if more and rows else ""
        return ModelPage(self.version, self.state.factors, rows, token)
