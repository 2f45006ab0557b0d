"""``./dev ui``: the Dagster UI on the demo's data.

Uses the demo's database and persistent Dagster instance (``.dbb_demo/dbb.sqlite`` and
``.dbb_demo/dagster_home``, both written by ``./dev demo``); when either is missing it runs the demo into
a fresh ``.dbb_demo`` first, so the UI shows the same simulated day's runs whether or not ``./dev demo``
ran before. Then it starts ``dagster dev`` on that instance and database. Runs launched from the UI use
dry-run sending (no fake server runs behind the UI), so a backfill of a few hours can be tried safely,
and the location's clock (``DBB_NOW``) pinned to the end of the simulated day, so its hours are inside
the digest catch-up window (``DIGEST_CATCH_UP_HOURS``) as they were when the demo ran.
The schedules and sensors are on (as after a deploy) and use dry-run too; the provider URLs point
at a closed loopback port, so even a Notion sync cannot reach a real API.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

from dbb_orchestration.demo import demo_env, run_demo
from dbb_orchestration.demo.world import DAY

WORKDIR = Path(".dbb_demo")
HOME = WORKDIR / "dagster_home"


def main(argv: list[str]) -> int:
    db = WORKDIR / "dbb.sqlite"
    if not db.exists() or not HOME.exists():
        # A database without its run history (e.g. from an older demo) would show a rerun's runs only.
        db.unlink(missing_ok=True)
        run_demo(workdir=WORKDIR, outbox="outbox", dagster_home=HOME)
    env = {
        **os.environ,
        **demo_env(f"sqlite:///{db.resolve()}"),
        "DAGSTER_HOME": str(HOME.resolve()),
        "DIGEST_EMAIL_DRY_RUN": "true",
        "SEQUENCE_EMAIL_DRY_RUN": "true",
        # Schedules and sensors run in the UI too: no fake runs behind it, so any provider call goes to a
        # closed loopback port and fails at once instead of reaching the real Resend or Notion.
        "RESEND_API_URL": "http://127.0.0.1:9",
        "NOTION_API_URL": "http://127.0.0.1:9",
        "DBB_NOW": (DAY + timedelta(days=1)).isoformat(),
    }
    dagster = str(Path(sys.executable).with_name("dagster"))
    os.execve(dagster, [dagster, "dev", "-w", "workspace.yaml", *argv], env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
