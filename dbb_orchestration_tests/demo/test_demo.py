"""The README's main command: a simulated day on the embedded default, rerunnable without duplicates."""

from __future__ import annotations

import email
import email.policy
import re
from datetime import timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path

import sqlalchemy as sa

from dbb_orchestration.db import create_db_engine
from dbb_orchestration.db import tables as t
from dbb_orchestration.demo import run_demo
from dbb_orchestration.demo.world import DAY


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

    assert run_demo(workdir=tmp_path / "w", outbox=outbox) == 0
    assert "0 emails written" in capsys.readouterr().out
    assert sorted(p.name for p in outbox.iterdir()) == first
    engine.dispose()
