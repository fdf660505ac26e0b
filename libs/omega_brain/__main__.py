"""``omega-brain``: the TV brain for firmware that is not written in Python.

``omega-brain serve --socket PATH`` (or ``--stdio``) answers newline-delimited JSON requests
with the JSON facade (`omega_brain.facade`, wire rules in `omega_brain.server`);
``omega-brain schema`` prints the JSON Schema of every request and reply.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import resources

from omega_brain.server import MAX_CLIENTS, MAX_LINE_BYTES, ServeError, serve_stdio, serve_unix

__all__ = ["main"]

_PROTOCOL = f"""\
protocol:
  One JSON object per line (UTF-8, at most {MAX_LINE_BYTES} bytes), one reply line per request:
    {{"op": "init", "device_id": "tv-1", "store_path": "/data/brain.db", "catalog_file": "c.npz"}}
    {{"op": "observe", "content_id": "m-1", "started_at_ms": 1700000000000, "completion": 0.9}}
    {{"op": "recommend", "k": 10}}   {{"op": "sync"}}   {{"op": "stats"}}
    {{"op": "forget"}}   {{"op": "shutdown"}}
  Replies: {{"ok": true, ...}} or {{"ok": false, "error": {{"type": "...", "code": N, "message":
  "..."}}}} with code 1 invalid request, 2 not initialized, 3 invalid event, 4 unknown content,
  5 catalog error, 6 sync error, 7 store error, 8 internal error, 9 other brain error.
  The brain stays open between clients; "shutdown" closes it, SIGTERM/SIGINT stop the server.
  `omega-brain schema` prints the JSON Schema (draft 2020-12) of every request and reply.
"""


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``serve`` and ``schema``."""
    parser = argparse.ArgumentParser(
        prog="omega-brain",
        description="The Exogenesis Omega TV brain behind a language-neutral JSON interface.",
        epilog=_PROTOCOL,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="answer newline-delimited JSON requests on a Unix socket or stdin/stdout",
        description=(
            "Serve one brain to local clients. Requests run one at a time in arrival order; "
            "SIGTERM or SIGINT closes the brain, removes the socket file and exits 0."
        ),
        epilog=_PROTOCOL,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = serve.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--socket",
        metavar="PATH",
        help="Unix socket file to listen on (created with mode 0600; a stale one is replaced)",
    )
    where.add_argument(
        "--stdio",
        action="store_true",
        help="read requests from stdin and write replies to stdout until end of input",
    )
    serve.add_argument(
        "--max-clients",
        type=int,
        default=MAX_CLIENTS,
        metavar="N",
        help=f"socket connections served at once (default {MAX_CLIENTS}; more wait)",
    )
    commands.add_parser(
        "schema", help="print the JSON Schema of the requests and replies (protocol.schema.json)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``omega-brain``; returns the exit status (0 ok, 1 cannot start, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "schema":
            text = resources.files("omega_brain").joinpath("protocol.schema.json").read_text()
            sys.stdout.write(text)
            return 0
        if args.max_clients < 1:
            parser.error("--max-clients must be >= 1")
        if args.stdio:
            serve_stdio()
        else:
            serve_unix(
                args.socket,
                max_clients=args.max_clients,
                on_ready=lambda: print(
                    f"omega-brain: listening on {args.socket}", file=sys.stderr, flush=True
                ),
            )
    except ServeError as exc:
        print(f"omega-brain: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the handlers were installed
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
