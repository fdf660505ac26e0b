"""``python -m omega_constellation``: run one constellation replica (config from environment)."""

from __future__ import annotations

import argparse
import asyncio

from omega_constellation.server import main_async
from omega_constellation.settings import ConstellationSettings


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``omega-constellation``."""
    parser = argparse.ArgumentParser(
        prog="omega-constellation",
        description="Constellation sync server: one shard replica. Settings come from "
        "OMEGA_CONSTELLATION_* environment variables (see settings.py).",
    )
    parser.add_argument("command", nargs="?", default="serve", choices=["serve"])
    parser.parse_args(argv)
    asyncio.run(main_async(ConstellationSettings()))


if __name__ == "__main__":
    main()
