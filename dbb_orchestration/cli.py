"""The ``dbb-orchestration`` command (``./dev check-schema``, ``./dev init-db``, ``./dev demo``).

Every failure prints one line to stderr, ``error: <what is wrong>: <how to fix it>``, and exits
non-zero: 1 when the database or the schema is the problem, 2 for a usage mistake (a missing or
malformed ``DATABASE_URL``, an unknown option).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from dbb_orchestration.db.engine import (
    DatabaseUrlError,
    connection_problem,
    create_db_engine,
    create_schema,
    normalize_database_url,
)

DESCRIPTION = """\
Tools around the Daily Brain Bits background jobs. Dagster runs the jobs themselves; these commands
check a database, create a local one, and run the demo.

Through the repository's ./dev script no virtualenv needs activating:
  ./dev check-schema                      check $DATABASE_URL (read-only)
  ./dev init-db --database-url sqlite:///dbb.sqlite
  ./dev demo --quiet
"""


class CliError(Exception):
    """A problem to report in one line; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _database_url(args: argparse.Namespace) -> str:
    url = args.database_url or os.environ.get("DATABASE_URL", "")
    if not url.strip():
        raise CliError(
            "DATABASE_URL is not set: export it (the backend's database URL) or pass --database-url", code=2
        )
    try:
        normalize_database_url(url)
    except DatabaseUrlError as exc:
        raise CliError(
            f"{exc}: use postgres://user:pass@host:5432/db or sqlite:///path/to/file", code=2
        ) from None
    return str(url)


def _existing_sqlite_file(raw_url: str) -> None:
    """check-schema is read-only: a SQLite path that does not exist would be created by opening it."""
    url = normalize_database_url(raw_url)
    database = url.database or ""
    if (
        url.get_backend_name() == "sqlite"
        and database not in ("", ":memory:")
        and not Path(database).exists()
    ):
        raise CliError(
            f"no SQLite file at {database!r}: check the path in DATABASE_URL "
            "(create a local database with ./dev init-db)"
        )


def cmd_init_db(args: argparse.Namespace) -> int:
    raw = _database_url(args)
    try:
        engine = create_db_engine(raw)
        create_schema(engine)
    except sa.exc.DBAPIError as exc:
        raise CliError(connection_problem(exc, normalize_database_url(raw))) from None
    print(f"created the DBB tables on {engine.url.render_as_string(hide_password=True)}")
    return 0


def cmd_check_schema(args: argparse.Namespace) -> int:
    from dbb_orchestration.db.schema_check import check_schema, has_no_tables

    raw = _database_url(args)
    _existing_sqlite_file(raw)
    try:
        engine = create_db_engine(raw)
        problems = check_schema(engine)
    except sa.exc.DBAPIError as exc:
        raise CliError(connection_problem(exc, normalize_database_url(raw))) from None
    where = engine.url.render_as_string(hide_password=True)
    if has_no_tables(problems):
        raise CliError(
            f"{where} has none of the DBB tables: point DATABASE_URL at the backend's database "
            "(or create a local one with ./dev init-db)"
        )
    for problem in problems:
        print(problem)
    fatal = [p for p in problems if p.fatal]
    if fatal:
        print(
            f"{len(fatal)} problem(s) on {where}: this code location cannot run safely against it; "
            "apply the backend's migrations, then check again"
        )
        return 1
    print(f"schema OK on {where} ({len(problems)} warning(s))")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dbb_orchestration.demo import run_demo

    return run_demo(
        workdir=args.workdir, outbox=args.outbox, quiet=args.quiet, dagster_home=args.dagster_home
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dbb-orchestration",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")

    url_help = "the database to use (default: $DATABASE_URL); postgres://… or sqlite:///…"
    p = sub.add_parser(
        "check-schema",
        help="check a live database has every table, column and enum value this code needs",
        description="Compare the database's schema with what this code location reads and writes. "
        "Read-only. Prints one line per problem; exits 1 if any problem would break a run, 0 when "
        "only warnings (e.g. extra enum values) are found. Run it after each backend migration.",
    )
    p.add_argument("--database-url", help=url_help)
    p.set_defaults(func=cmd_check_schema)

    p = sub.add_parser(
        "init-db",
        help="create the DBB tables in an empty database (local experiments and tests, never production)",
        description="Create every DBB table, enum and index in the given database. For local "
        "experiments only: in production the backend owns the schema.",
    )
    p.add_argument("--database-url", help=url_help)
    p.set_defaults(func=cmd_init_db)
    _add_demo_command(sub)
    return parser


def _add_demo_command(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="simulate a day on SQLite with the local fake Resend and Notion; emails land in ./outbox",
        description="Seed a small world into a SQLite database, run 24 hourly digest partitions, the "
        "sensors, upgrade discovery and a Notion sync against loopback fakes, write every email to the "
        "outbox (.html, .txt, .eml) and print what was sent. Nothing leaves this machine.",
    )
    p.add_argument(
        "--workdir", default=".dbb_demo", help="where the demo database lives (default: .dbb_demo)"
    )
    p.add_argument("--outbox", default="outbox", help="where emails are written (default: ./outbox)")
    p.add_argument(
        "--quiet",
        action="store_true",
        help="do not print the per-hour table and the summary (a few sensor log lines still go to "
        "stderr); the exit status says whether every run succeeded",
    )
    p.add_argument(
        "--dagster-home",
        help="the Dagster instance for the runs (default <workdir>/dagster_home, read by `./dev ui`)",
    )
    p.set_defaults(func=cmd_demo)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code


if __name__ == "__main__":
    sys.exit(main())
