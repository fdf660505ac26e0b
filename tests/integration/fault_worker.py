"""``python tests/integration/fault_worker.py``: `omega-federation run-once` that dies by
SIGKILL right after it checkpointed the round (``WorkerState.save_aggregated`` committed),
before it publishes anything: the crash of `test_faults_federation`.

The worker has no crash hook of its own, so this script wraps the method in its own process
and then runs the real command line (settings from ``OMEGA_FEDERATION_*``).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from omega_federation.__main__ import main
from omega_federation.state import WorkerState

_save_aggregated = WorkerState.save_aggregated


async def _save_then_die(self: WorkerState, *args: Any, **kwargs: Any) -> None:
    await _save_aggregated(self, *args, **kwargs)  # autocommit: the checkpoint is durable
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    WorkerState.save_aggregated = _save_then_die  # type: ignore[method-assign]
    main(["run-once"])
