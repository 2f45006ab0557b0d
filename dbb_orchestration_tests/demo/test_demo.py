"""The README's main command: a simulated day on the embedded default, rerunnable without duplicates."""

from __future__ import annotations

import email
import email.policy
import re
from datetime import timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path

import dagster as dg
import sqlalchemy as sa
import yaml

from dbb_orchestration.db import create_db_engine
from dbb_orchestration.db import tables as t
from dbb_orchestration.demo import LOCATION_NAME, REPOSITORY_LABEL, REPOSITORY_LABEL_TAG, run_demo
from dbb_orchestration.demo.world import DAY

WORKSPACE = Path(__file__).resolve().parents[2] / "workspace.yaml"


def ui_partition_statuses(home: Path) -> dict[str, str]:
    """What the UI's Partitions view of digest_hourly_job reads: the partition data of the runs tagged
    with the job's partition set and the location's repository label."""
    with dg.DagsterInstance.from_config(str(home)) as instance:
        data = instance.run_storage.get_run_partition_data(
            dg.RunsFilter(
                tags={
                    "dagster/partition_set": "digest_hourly_job_partition_set",
                    REPOSITORY_LABEL_TAG: REPOSITORY_LABEL,
                }
            )
        )
        return {d.partition: d.status.value for d in data}


def run_ids(home: Path) -> list[str]:
    with dg.DagsterInstance.from_config(str(home)) as instance:
        return sorted(r.run_id for r in instance.get_runs())


def test_demo_day_sends_emails_and_a_rerun_sends_nothing_twice(tmp_path: Path, capsys) -> None:
    outbox = tmp_path / "outbox"
    assert run_demo(workdir=tmp_path / "w", outbox=outbox) == 0
    table = capsys.readouterr().out
    first = sorted(p.name for p in outbox.iterdir())
    assert "hour  created  due  sent" in table and "Asia/Kolkata" not in table
    emails = [n for n in first if n.endswith(".eml")]
    assert len(emails) >= 10
    assert {n.rsplit(".", 1)[1] for n in first} == {"eml", "html", "txt"}
    assert any("your-first-brain-bits" in n for n in emails)
    assert any("brain-bits-" in n and "first" not in n for n in emails)
    engine = create_db_engine(f"sqlite:///{tmp_path / 'w' / 'dbb.sqlite'}")
    with engine.connect() as conn:
        sent_digests = conn.execute(
            sa.select(sa.func.count()).select_from(t.note_digests).where(t.note_digests.c.sent_at >= DAY)
        ).scalar_one()
        step_sends = conn.execute(sa.select(sa.func.count()).select_from(t.email_sends)).scalar_one()
        synced = conn.execute(
            sa.select(sa.func.count()).select_from(t.sync_runs).where(t.sync_runs.c.status == "success")
        ).scalar_one()
    assert sent_digests + step_sends == len(emails)
    assert synced == 4
    # For every sent email the note text and the layout are there, and nothing from notes is unescaped.
    html = next(outbox.glob("*your-first-brain-bits*.html")).read_text()
    assert "http://localhost:3000/dash" in html and "<script" not in html
    # Every .eml is dated by the simulated day, not by the real clock.
    for eml in outbox.glob("*.eml"):
        message = email.message_from_bytes(eml.read_bytes(), policy=email.policy.default)
        sent = parsedate_to_datetime(str(message["Date"]))
        assert DAY <= sent < DAY + timedelta(days=1), (eml.name, message["Date"])
        assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert str(message["List-Unsubscribe"]).startswith("<http://localhost:3000/unsubscribe?token=u_")
    # Numbers in the emails add up: a person with sent digests has had notes resurfaced.
    for upgrade in outbox.glob("*your-brain-bits-so-far*.txt"):
        digests, notes = re.findall(r"- (\d+) (?:digests received|notes resurfaced)", upgrade.read_text())
        assert int(digests) > 0 and int(notes) >= int(digests)
    # Inline markdown never shows as literal markers in the plain-text part.
    assert not [p.name for p in outbox.glob("*brain-bits*.txt") if "*what is in my control" in p.read_text()]

    # the 24 hours are ran partitions in the UI's eyes, under the location of workspace.yaml
    home = tmp_path / "w" / "dagster_home"
    (location,) = yaml.safe_load(WORKSPACE.read_text())["load_from"]
    assert location["python_module"]["location_name"] == LOCATION_NAME
    statuses = ui_partition_statuses(home)
    assert sorted(statuses) == [f"{DAY.date()}-{h:02d}:00" for h in range(24)]
    assert set(statuses.values()) == {"SUCCESS"}
    runs_after_first = run_ids(home)
    assert len(runs_after_first) == sum(int(n) for n in re.findall(r"'\w+': (\d+)", table.split("runs: ")[1]))

    assert run_demo(workdir=tmp_path / "w", outbox=outbox) == 0
    again = capsys.readouterr().out
    assert "0 emails written" in again
    assert "per run, not cumulative" in again
    assert re.search(r"^total\s+0\s", again, re.MULTILINE)  # the rerun created no digest
    assert "already_generated" in again and "already_sent_today" in again  # and says why
    assert sorted(p.name for p in outbox.iterdir()) == first
    engine.dispose()


def test_the_repository_label_is_the_one_the_ui_gives_the_location() -> None:
    """The UI attributes runs to `<repository name>@<location name>`: the repository of our Definitions
    and the location name workspace.yaml gives it."""
    from dbb_orchestration.definitions import defs

    (location,) = yaml.safe_load(WORKSPACE.read_text())["load_from"]
    name = location["python_module"]["location_name"]
    assert f"{defs.get_repository_def().name}@{name}" == REPOSITORY_LABEL
