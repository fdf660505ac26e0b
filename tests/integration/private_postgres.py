"""A private Postgres cluster a test may stop and start: initdb + pg_ctl in a temp folder.

Uses the system's binaries (``/usr/lib/postgresql/<version>/bin``) or else the ones bundled
with ``pgserver``; listens on 127.0.0.1 on a free port (no unix socket), trust auth. As root,
the server runs as the ``postgres`` user (or pgserver's ``pgserver`` user), since Postgres
refuses to run as root.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

__all__ = ["PrivatePostgres", "postgres_bin_dir"]


def postgres_bin_dir() -> Path | None:
    """A folder holding ``initdb``, ``pg_ctl`` and ``postgres``, or None."""

    def usable(folder: Path) -> bool:
        return all((folder / exe).is_file() for exe in ("initdb", "pg_ctl", "postgres"))

    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if usable(folder):
            return folder
    with contextlib.suppress(ImportError):
        import pgserver

        folder = Path(pgserver.__file__).parent / "pginstall" / "bin"
        if usable(folder):
            return folder
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_as() -> str | None:
    """The user to run Postgres as when we are root (None when we are not)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "pgserver"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    from pgserver.utils import ensure_user_exists  # creates the user pgserver itself uses

    ensure_user_exists("pgserver")
    return "pgserver"


class PrivatePostgres:
    """One cluster in a fresh temp folder; `start`, `stop`, `start` again, `destroy`."""

    def __init__(self, bin_dir: Path) -> None:
        self._bin = bin_dir
        self._user = _run_as()
        self.root = Path(tempfile.mkdtemp(prefix="omega-private-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.port = _free_port()
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._pg(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
        )
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                "unix_socket_directories = ''\nfsync = off\nmax_connections = 50\n"
            )

    def _pg(self, exe: str, *args: str, timeout: float = 60.0) -> None:
        command = [str(self._bin / exe), *args]
        user = None
        if self._user is not None:
            runuser = shutil.which("runuser")
            if runuser is not None:
                command = [runuser, "-u", self._user, "--", *command]
            else:
                user = self._user
        # Without ``user``/``cwd``, CPython starts the child with posix_spawn or vfork: a plain
        # fork() in this multi-threaded process (gRPC's threads and fork handlers) can crash
        # the child before it execs.
        subprocess.run(command, check=True, capture_output=True, timeout=timeout, user=user)

    def start(self) -> None:
        """Start the server and wait until it accepts connections.

        Raises:
            subprocess.CalledProcessError: pg_ctl failed (see ``self.log``).
        """
        self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30", "start")

    def stop(self) -> None:
        """Stop the server (fast shutdown: sessions are cut) and wait until it is down."""
        self._pg("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop")

    def destroy(self) -> None:
        """Stop the server if it runs and delete the folder."""
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self._pg("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop")
        shutil.rmtree(self.root, ignore_errors=True)
