"""Run a fake on 127.0.0.1 until Ctrl-C or SIGTERM.

    python -m dbb_orchestration.testing resend --port 0 [--outbox DIR] [--rate-limit 2] [--api-key re_x]
    python -m dbb_orchestration.testing notion --port 8765 [--token tok | --any-token] [--seed seed.json]
                                               [--block-page-size 2] [--rate-limit 3]

The first line printed on stdout is the base URL (for ``RESEND_API_URL`` / ``NOTION_API_URL``); a
status line follows on stderr. Exit code 0 on Ctrl-C/SIGTERM, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from dbb_orchestration.testing._http import LoopbackServer
from dbb_orchestration.testing.fake_notion import FakeNotion
from dbb_orchestration.testing.fake_resend import FakeResend


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dbb_orchestration.testing", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="service", required=True)

    resend = sub.add_parser("resend", help="fake Resend email API")
    resend.add_argument("--host", default="127.0.0.1")
    resend.add_argument("--port", type=int, default=0)
    resend.add_argument(
        "--outbox", type=Path, default=None, help="write accepted emails here (.html/.txt/.eml)"
    )
    resend.add_argument("--rate-limit", type=float, default=None, help="requests per second (default: none)")
    resend.add_argument("--api-key", action="append", default=None, help="accepted key (default: any)")

    notion = sub.add_parser("notion", help="fake Notion API (2025-09-03)")
    notion.add_argument("--host", default="127.0.0.1")
    notion.add_argument("--port", type=int, default=0)
    notion.add_argument("--token", action="append", default=[], help="a valid bearer token (repeatable)")
    notion.add_argument("--any-token", action="store_true", help="accept any non-empty token")
    notion.add_argument("--seed", type=Path, default=None, help="JSON data (see FakeNotion.load_seed)")
    notion.add_argument("--block-page-size", type=int, default=None)
    notion.add_argument("--rate-limit", type=float, default=None, help="requests per second per token")
    return parser


def build_fake(args: argparse.Namespace) -> LoopbackServer:
    """The configured, not yet started fake. A bad seed file raises ``OSError``/``ValueError``."""
    if args.service == "resend":
        return FakeResend(
            host=args.host,
            port=args.port,
            outbox_dir=args.outbox,
            rate_limit_per_second=args.rate_limit,
            api_keys=args.api_key,
        )
    fake = FakeNotion(
        host=args.host,
        port=args.port,
        tokens=args.token,
        accept_any_token=args.any_token,
        block_page_size=args.block_page_size,
        rate_limit_per_second=args.rate_limit,
    )
    if args.seed is not None:
        fake.load_seed(json.loads(args.seed.read_text(encoding="utf-8")))
    return fake


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        fake = build_fake(args)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        fake.start()
    except OSError as exc:  # port in use, address not available
        print(f"error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    with fake:
        print(fake.base_url, flush=True)
        print(
            f"fake {args.service} listening on {fake.base_url} (Ctrl-C to stop)", file=sys.stderr, flush=True
        )
        while not stop.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
