"""Every CLI failure is one line naming the problem and the fix, with a non-zero exit status."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from dbb_orchestration.cli import build_parser, main
from dbb_orchestration.db import create_db_engine, create_schema
from dbb_orchestration_tests.conftest import postgres_admin_url

ROOT = Path(__file__).resolve().parents[1]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port that is bound but not listening: connecting to it is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


@pytest.mark.parametrize("command", ["check-schema", "init-db"])
def test_connection_refused_is_one_line(
    command: str, refused_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"postgresql://postgres:hunter2@127.0.0.1:{refused_port}/postgres"
    code, out, err = run([command, "--database-url", url], capsys)
    assert code == 1 and out == ""
    line = one_error_line(err)
    assert f"127.0.0.1:{refused_port}" in line and "connection refused" in line
    assert "start the server" in line and "DATABASE_URL" in line
    assert "hunter2" not in line


@pytest.mark.postgres
def test_unknown_postgres_database_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    admin = postgres_admin_url()
    if admin is None:
        pytest.skip("set DBB_TEST_POSTGRES_URL to run Postgres tests")
    name = f"dbb_missing_{uuid.uuid4().hex[:8]}"
    url = make_url(admin).set(database=name).render_as_string(hide_password=False)
    code, out, err = run(["check-schema", "--database-url", url], capsys)
    assert code == 1 and out == ""
    line = one_error_line(err)
    assert f"database '{name}' does not exist" in line and "create it" in line


def test_sqlite_file_without_tables_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "empty.sqlite"
    create_db_engine(f"sqlite:///{path}").dispose()  # an empty SQLite database
    code, out, err = run(["check-schema", "--database-url", f"sqlite:///{path}"], capsys)
    assert code == 1 and out == ""
    line = one_error_line(err)
    assert "none of the DBB tables" in line and "init-db" in line


def test_check_schema_never_creates_a_missing_sqlite_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "typo.sqlite"
    code, _, err = run(["check-schema", "--database-url", f"sqlite:///{path}"], capsys)
    assert code == 1
    assert "no SQLite file" in one_error_line(err)
    assert not path.exists()


def test_init_db_in_a_missing_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'no' / 'such' / 'dir.sqlite'}"
    code, _, err = run(["init-db", "--database-url", url], capsys)
    assert code == 1
    assert "folder exists" in one_error_line(err)


def test_missing_table_is_named_with_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'partial.sqlite'}"
    engine = create_db_engine(url)
    create_schema(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE email_sends")
    engine.dispose()
    code, out, err = run(["check-schema", "--database-url", url], capsys)
    assert code == 1 and err == ""
    assert out.splitlines()[0] == "ERROR email_sends: table is missing"
    assert "1 problem(s)" in out and "apply the backend's migrations" in out


@pytest.mark.parametrize(
    ("env_url", "expected"),
    [("", "DATABASE_URL is not set"), ("mysql://x/y", "must be a postgres:// or sqlite:// URL")],
)
def test_bad_database_url_is_a_usage_error(
    env_url: str, expected: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", env_url)
    code, _, err = run(["check-schema"], capsys)
    assert code == 2
    assert expected in one_error_line(err)


def test_help_is_written_for_people() -> None:
    parser = build_parser()
    top = parser.format_help()
    assert "``" not in top and "check-schema" in top and "./dev" in top
    demo = next(
        action.choices["demo"]  # type: ignore[index]
        for action in parser._actions
        if action.dest == "command"
    )
    quiet = next(a for a in demo._actions if "--quiet" in a.option_strings)
    assert quiet.help and "per-hour table" in quiet.help and "exit status" in quiet.help


def _dev(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ROOT / "dev"), *args], capture_output=True, text=True, env=env or dict(os.environ), timeout=120
    )


def test_dev_rejects_an_unknown_command_with_exit_2() -> None:
    result = _dev("frobnicate")
    assert result.returncode == 2
    assert result.stderr.startswith("error: unknown command 'frobnicate'")
    assert "./dev check-schema" in result.stderr


def test_dev_help_exits_0_and_lists_the_forwarded_commands() -> None:
    result = _dev("help")
    assert result.returncode == 0
    for command in ("check-schema", "init-db", "bench", "Python 3.11"):
        assert command in result.stdout


def test_dev_requires_python_311(tmp_path: Path) -> None:
    fake = tmp_path / "python3"
    fake.write_text("#!/bin/sh\necho 3.12\n")
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "DBB_VENV": str(tmp_path / "venv")}
    result = _dev("test", env=env)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: Python 3.11 is required, '{fake}' is 3.12: install Python 3.11 "
        "(or set PYTHON=/path/to/python3.11)"
    )
    assert not (tmp_path / "venv").exists()


def test_dev_forwards_check_schema_to_the_venv(tmp_path: Path) -> None:
    venv = Path(sys.prefix)
    if not (venv / ".dbb-installed").exists():
        pytest.skip("the tests do not run from a ./dev-managed virtualenv")
    env = {**os.environ, "DBB_VENV": str(venv), "DATABASE_URL": f"sqlite:///{tmp_path / 'absent.sqlite'}"}
    result = _dev("check-schema", env=env)
    assert result.returncode == 1
    assert result.stderr.startswith("error: no SQLite file")
    assert len(result.stderr.strip().splitlines()) == 1


def test_dev_bench_with_an_unknown_name_is_one_line() -> None:
    result = _dev("bench", "nope")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: no benchmark named 'nope': use one of ")
    for script in (ROOT / "benchmarks").glob("*.py"):
        # every benchmark is named; shared helpers (``_*.py``) are not benchmarks
        assert (script.stem in line) != script.stem.startswith("_")
