"""A client of `omega-brain serve --socket PATH` with the Python standard library only.

Usage: python omega_client.py SOCKET_PATH [CATALOG_NPZ [CONTENT_ID]]

Sends init (an offline brain in RAM), observe, recommend, stats and shutdown, prints
"<op>: <reply>" for each, and exits 2 at the first error reply (after closing the brain), 1
when the server cannot be reached.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from typing import Any


class BrainClient:
    """One connection to the server: `call` sends a request line and reads its reply line."""

    def __init__(self, path: str, timeout_seconds: float = 60.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout_seconds)
        self._sock.connect(path)
        self._replies = self._sock.makefile("rb")

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        line = self._replies.readline()
        if not line.endswith(b"\n"):
            raise ConnectionError("the server closed the connection")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def close(self) -> None:
        self._replies.close()
        self._sock.close()


def main(argv: list[str]) -> int:
    if not 2 <= len(argv) <= 4:
        print(__doc__, file=sys.stderr)
        return 1
    init: dict[str, Any] = {"op": "init", "device_id": "python-client", "store_path": ":memory:"}
    if len(argv) > 2:
        init["catalog_file"] = argv[2]
    content_id = argv[3] if len(argv) > 3 else "item-0"
    steps: list[dict[str, Any]] = [
        init,
        {
            "op": "observe",
            "content_id": content_id,
            "started_at_ms": int(time.time() * 1000),
            "completion": 0.95,
        },
        {"op": "recommend", "k": 5},
        {"op": "stats"},
        {"op": "shutdown"},
    ]
    try:
        client = BrainClient(argv[1])
    except OSError as exc:
        print(f"omega_client.py: cannot connect to {argv[1]}: {exc}", file=sys.stderr)
        return 1
    try:
        for i, request in enumerate(steps):
            reply = client.call(request)
            print(f"{request['op']}: {json.dumps(reply)}")
            if not reply["ok"]:
                error = reply["error"]
                print(
                    f"omega_client.py: {request['op']} failed: code {error['code']} "
                    f"{error['type']}: {error['message']}",
                    file=sys.stderr,
                )
                if 0 < i < len(steps) - 1:  # init had succeeded: still close the brain
                    client.call({"op": "shutdown"})
                return 2
    except (OSError, ValueError) as exc:
        print(f"omega_client.py: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
