"""The ``dbb-orchestration`` command: local database setup, schema checks, fakes and the demo."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from dbb_orchestration.db.engine import DatabaseUrlError, create_db_engine, create_schema


def _database_url(args: argparse.Namespace) -> str:
    url = args.database_url or os.environ.get("DATABASE_URL", "")
    if not url:
        raise SystemExit("error: DATABASE_URL is not set (or pass --database-url)")
    return str(url)


def cmd_init_db(args: argparse.Namespace) -> int:
    engine = create_db_engine(_database_url(args))
    create_schema(engine)
    print(f"created the DBB tables on {engine.url.render_as_string(hide_password=True)}")
    return 0


def cmd_check_schema(args: argparse.Namespace) -> int:
    from dbb_orchestration.db.schema_check import check_schema

    engine = create_db_engine(_database_url(args))
    problems = check_schema(engine)
    where = engine.url.render_as_string(hide_password=True)
    for problem in problems:
        print(problem)
    fatal = [p for p in problems if p.fatal]
    if fatal:
        print(f"{len(fatal)} problem(s) on {where}: this code location cannot run safely against it")
        return 1
    print(f"schema OK on {where} ({len(problems)} warning(s))")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dbb_orchestration.demo import run_demo

    return run_demo(
        workdir=args.workdir, outbox=args.outbox, quiet=args.quiet, dagster_home=args.dagster_home
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dbb-orchestration", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init-db", help="create the DBB tables (tests and local runs; never production)")
    p.add_argument("--database-url", help="defaults to $DATABASE_URL")
    p.set_defaults(func=cmd_init_db)

    p = sub.add_parser(
        "check-schema", help="read-only: report what the live schema lacks; exit 1 if anything"
    )
    p.add_argument("--database-url", help="defaults to $DATABASE_URL")
    p.set_defaults(func=cmd_check_schema)

    p = sub.add_parser("demo", help="simulate a day on SQLite with the local fakes; emails land in ./outbox")
    p.add_argument("--workdir", default=".dbb_demo", help="where the demo database lives (default .dbb_demo)")
    p.add_argument("--outbox", default="outbox", help="where emails are written (default ./outbox)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument(
        "--dagster-home",
        help="the Dagster instance for the runs (default <workdir>/dagster_home, read by `./dev ui`)",
    )
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except DatabaseUrlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
