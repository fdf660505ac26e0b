"""The brain that `test_brain_crash` kills: a fork server and the worker it forks.

``python tests/integration/brain_crash_child.py`` imports the brain once (numpy, faiss, grpc:
about a second) and then serves one JSON line per life on stdin: it forks a worker that opens
the brain on the given store and runs a seeded random mix of ``observe``, ``sync``,
``fetch_catalog`` and ``load_catalog`` until the fork server kills it with SIGKILL after the
given delay; then it answers one JSON line on stdout (the worker's pid and how it ended).
Forking a process that already imported everything makes a life cost milliseconds instead of
a second, so hundreds of kills fit in a test. The fork server itself kills and reaps its
worker, so a pid is never signalled after it could have been reused.

The worker writes its progress log, one JSON line per step, with a single unbuffered
``write`` on an append-only file (no fsync: the test reads it after the kill, and what counts
is that the call had returned): ``{"begin": op, ...}`` before a call and ``{"done": op, ...}``
with the versions the brain reported after it returns. A kill leaves at most one ``begin``
without its ``done``: the call in flight.

The catalog helpers (`variant`, `fingerprint`) are shared with the test: every catalog the
brain may hold is the 300-item base catalog with five items changed, named by the titles of
the changed items, so a catalog is recognized from its titles alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

ITEMS = 300
CHANGED_PER_VARIANT = 5
DEVICE_ID = "tv-crash"
BASE_MS = 1_795_300_000_000  # a Tuesday, 19:06 UTC
EXACT_MAX_ITEMS = 100
"""Below the catalog size: the brain's index is HNSW (SQ8), whose updates copy and append."""
MIXES = {
    "mixed": {"observe": 60, "sync": 20, "fetch_catalog": 10, "load_catalog": 10},
    "viewing": {"observe": 1},
}
"""Call mixes a life may run: ``viewing`` lives are killed mostly inside ``observe`` (it
takes about a millisecond, syncs and catalog updates tens)."""


def brain_settings(store_path: str) -> dict[str, Any]:
    """The `BrainConfig` fields of every brain of the test (worker and checker alike)."""
    return {
        "store_path": store_path,
        "exact_search_max_items": EXACT_MAX_ITEMS,
        "honour_sync_pace": False,
        "max_attempts": 3,
        "base_backoff_seconds": 0.01,
        "max_backoff_seconds": 0.05,
        "retry_budget_seconds": 5.0,
        "timeout_seconds": 5.0,
    }


@dataclass(frozen=True, slots=True)
class Variant:
    """One catalog: ids, (n, 384) float32 unit embeddings, titles and genres."""

    ids: list[str]
    embeddings: npt.NDArray[np.float32]
    titles: list[str]
    genres: list[list[str]]

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.ids, self.titles)


def _unit_rows(seed: int, n: int) -> npt.NDArray[np.float32]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 384)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


_BASE = _unit_rows(7, ITEMS)


def variant(kind: str, generation: int) -> Variant:
    """The base catalog with five items changed (embedding and title); generation 0 of any
    kind is the base catalog itself.

    Args:
        kind: ``"L"`` for catalogs given to `Brain.load_catalog`, ``"S"`` for the shard's.
        generation: >= 0.
    """
    ids = [f"c{i:04d}" for i in range(ITEMS)]
    emb = _BASE.copy()
    titles = [f"Title {i}" for i in range(ITEMS)]
    genres = [["Drama", "Comedy"] if i % 2 else ["Sci-Fi"] for i in range(ITEMS)]
    if generation:
        changed = sorted({(generation * 37 + j * 61) % ITEMS for j in range(CHANGED_PER_VARIANT)})
        seed = (1_000_003 if kind == "S" else 2_000_003) + generation
        emb[changed] = _unit_rows(seed, len(changed))
        for i in changed:
            titles[i] = f"{kind}{generation} #{i}"
    return Variant(ids, emb, titles, genres)


def fingerprint(ids: Sequence[str], titles: Sequence[str]) -> str:
    """Names a catalog by its items' titles in id order."""
    pairs = sorted(zip(ids, titles, strict=True))
    return hashlib.sha256("\n".join(f"{c}\t{t}" for c, t in pairs).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------- worker


class _Log:
    """Append-only progress log: one unbuffered write per line."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, record: dict[str, Any]) -> None:
        os.write(self._fd, (json.dumps(record, sort_keys=True) + "\n").encode())


def _run_worker(command: dict[str, Any]) -> None:
    from omega_brain import Brain, BrainConfig, GrpcTransport, ViewingEvent

    if command.get("die_after_reply"):
        _die_after_the_shard_answers(GrpcTransport)
    log = _Log(str(command["log"]))
    rng = random.Random(int(command["seed"]))
    generation = int(command["generation"])
    log.write({"begin": "open"})
    transport = GrpcTransport(str(command["target"]), plaintext=True)
    brain = Brain(
        DEVICE_ID, BrainConfig(**brain_settings(str(command["store"]))), transport=transport
    )

    def versions() -> dict[str, Any]:
        stats = brain.stats()
        catalog = brain.catalog
        fp = (
            fingerprint(catalog.content_ids, [catalog.title_of(c) for c in catalog.content_ids])
            if catalog is not None
            else ""
        )
        return {
            "local": stats.local_version,
            "acked": stats.acked_version,
            "global": stats.global_version,
            "catalog": stats.catalog_version,
            "model": stats.model_version,
            "fp": fp,
        }

    log.write({"done": "open", **versions()})
    mix = MIXES[str(command["mix"])]
    ops = list(mix)
    weights = list(mix.values())
    script = [str(op) for op in command.get("script", ())]
    for step in range(len(script) if script else int(command["max_ops"])):
        op = script[step] if script else rng.choices(ops, weights)[0]
        if brain.catalog is None and op == "observe":
            op = "fetch_catalog"
        if op == "observe":
            catalog = brain.catalog
            assert catalog is not None
            version = brain.stats().local_version + 1
            content = catalog.content_ids[rng.randrange(len(catalog))]
            started = BASE_MS + version * 60_000
            log.write({"begin": op, "version": version, "content": content, "started": started})
            brain.observe(ViewingEvent(content, started, rng.choice((0.1, 0.5, 0.95))))
            log.write({"done": op, "version": version, **versions()})
        elif op == "sync":
            log.write({"begin": op})
            result = brain.sync()
            log.write({"done": op, "ok": result.ok, "error": result.error, **versions()})
        elif op == "fetch_catalog":
            log.write({"begin": op})
            brain.fetch_catalog()
            log.write({"done": op, **versions()})
        else:
            generation += 1
            cat = variant("L", generation)
            log.write({"begin": op, "generation": generation, "expect": cat.fingerprint})
            brain.load_catalog(cat.ids, cat.embeddings, cat.titles, cat.genres)
            log.write({"done": op, "generation": generation, **versions()})
    brain.close()
    transport.close()
    log.write({"finished": True})


def _die_after_the_shard_answers(transport_class: Any) -> None:
    """Make the worker SIGKILL itself as soon as the shard answers a sync that carried a
    delta: the shard has applied it, the brain has not stored the acknowledgement."""
    real = transport_class.sync_patterns

    def sync_patterns(self: Any, request: Any, timeout: float) -> Any:
        response = real(self, request, timeout)
        if request.local_version > 0:
            os.kill(os.getpid(), signal.SIGKILL)
        return response

    transport_class.sync_patterns = sync_patterns


def _fork_and_kill(command: dict[str, Any]) -> dict[str, Any]:
    """Run one life: fork a worker, SIGKILL it after ``kill_after_ms``, reap it."""
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the worker: never returns into the fork server's loop
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)  # the fork server's answers own stdout
        code = 0
        try:
            _run_worker(command)
        except BaseException:
            code = 3
            _Log(str(command["log"])).write({"failed": traceback.format_exc()})
        os._exit(code)
    deadline = started + float(command["kill_after_ms"]) / 1000.0
    status = 0
    while True:  # sleep until the deadline unless the worker ends first
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        left = deadline - time.monotonic()
        if left <= 0:
            os.kill(pid, signal.SIGKILL)  # our own unreaped child: the pid cannot be reused
            _, status = os.waitpid(pid, 0)
            break
        time.sleep(min(left, 0.002))
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    return {
        "pid": pid,
        "killed": killed,
        "exit_code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        "lived_ms": round((time.monotonic() - started) * 1000.0, 1),
    }


def main() -> None:
    """The fork server: one JSON command per stdin line, one JSON answer per stdout line."""
    import omega_brain  # noqa: F401  (imported once, before any fork: the point of the server)

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        print(json.dumps(_fork_and_kill(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
