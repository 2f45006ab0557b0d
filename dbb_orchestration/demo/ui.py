"""``./dev ui``: the Dagster UI on the demo's data.

Runs the demo into ``.dbb_demo`` with a persistent Dagster instance (``.dbb_demo/dagster_home``) if it
has not run yet, then starts ``dagster dev`` on that instance and database, so the simulated day's runs
and their metadata are browsable. Runs launched from the UI use dry-run sending (no fake server runs
behind the UI), so a backfill of a few hours can be tried safely. The schedules and sensors are on
(as after a deploy) and use dry-run too; the provider URLs point at a closed loopback port, so even a
Notion sync cannot reach a real API.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from dbb_orchestration.demo import demo_env, run_demo

WORKDIR = Path(".dbb_demo")
HOME = WORKDIR / "dagster_home"


def main(argv: list[str]) -> int:
    if not (WORKDIR / "dbb.sqlite").exists() or not HOME.exists():
        run_demo(workdir=WORKDIR, outbox="outbox", dagster_home=HOME)
    env = {
        **os.environ,
        **demo_env(f"sqlite:///{(WORKDIR / 'dbb.sqlite').resolve()}"),
        "DAGSTER_HOME": str(HOME.resolve()),
        "DIGEST_EMAIL_DRY_RUN": "true",
        "SEQUENCE_EMAIL_DRY_RUN": "true",
        # Schedules and sensors run in the UI too: no fake runs behind it, so any provider call goes to a
        # closed loopback port and fails at once instead of reaching the real Resend or Notion.
        "RESEND_API_URL": "http://127.0.0.1:9",
        "NOTION_API_URL": "http://127.0.0.1:9",
    }
    dagster = str(Path(sys.executable).with_name("dagster"))
    os.execve(dagster, [dagster, "dev", "-w", "workspace.yaml", *argv], env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
