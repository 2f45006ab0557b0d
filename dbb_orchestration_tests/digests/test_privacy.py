"""No note text, email address or key reaches a digest run's event log (DESIGN principle 7)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest
import sqlalchemy as sa
from dagster._serdes import serialize_value

from dbb_orchestration.content import ContentKeyring
from dbb_orchestration.db import create_db_engine
from dbb_orchestration.db import tables as t
from dbb_orchestration.db.engine import shared_engine
from dbb_orchestration.definitions import build_resources
from dbb_orchestration.digests.defs import (
    SEND_FOR_USER_OP,
    DigestSendForUserConfig,
    digest_hourly_job,
    digest_send_for_user_job,
)
from dbb_orchestration.testing import FakeResend
from dbb_orchestration.testing import factories as f

KEY = bytes(range(100, 132))
KEY_B64 = base64.b64encode(KEY).decode()
API_KEY = "re_privacy_test_key_123456"
SECRET_NOTE = "Tuesday's therapy session: the zebra password is hunter2"
SECRET_TITLE = "Private journal about Zanzibar"
FAILING_EMAIL = "marguerite.failing@private-mail.test"
OK_EMAIL = "octavia.ok@private-mail.test"
FIRST_EMAIL = "fiona.first@private-mail.test"
WALL = datetime(2026, 2, 8, 8, 0, 30, tzinfo=UTC)


@pytest.fixture
def app_url(db_url: str) -> Iterator[str]:
    yield db_url
    shared_engine(db_url).dispose()


def _world(url: str) -> None:
    keyring = ContentKeyring.from_keys({1: KEY})
    engine = create_db_engine(url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        for uid, email, hour in (
            ("u-fail", FAILING_EMAIL, 8),
            ("u-ok", OK_EMAIL, 8),
            ("u-first", FIRST_EMAIL, 20),
        ):
            f.user(conn, uid, email=email, name="Marguerite Secretname")
            f.settings(conn, uid, preferred_send_hour=hour)
            conn_id = f.connection(conn, uid, display_name="Hidden Vault Name")
            for n in range(2):
                f.document(
                    conn,
                    uid,
                    conn_id,
                    external_id=f"{uid}-{n}",
                    title=SECRET_TITLE,
                    markdown=f"{SECRET_NOTE} ({n})",
                    keyring=keyring,
                )
            if uid != "u-first":
                f.digest(conn, uid, status="sent", sent_at=WALL - timedelta(days=10))
    engine.dispose()


def _log_text(instance: dg.DagsterInstance, run_id: str) -> str:
    """Every event of the run, messages and metadata included, as one string."""
    records = instance.all_logs(run_id)
    assert records
    return "\n".join(serialize_value(record) + "\n" + record.message for record in records)


def test_run_event_logs_hold_ids_and_counts_only(app_url: str) -> None:
    _world(app_url)
    env = {
        "DATABASE_URL": app_url,
        "DBB_NOW": WALL.isoformat(),
        "EMAIL_RATE_LIMIT_PER_SECOND": "0",
        "EMAIL_MAX_CONCURRENCY": "1",  # the injected error hits u-fail, the first user by id
        "CONTENT_ENCRYPTION_KEY": KEY_B64,
        "RESEND_API_KEY": API_KEY,
    }
    with FakeResend() as fake, dg.DagsterInstance.ephemeral() as instance:
        env["RESEND_API_URL"] = fake.base_url
        # the provider's error message names the address: it must stay out of the event log
        fake.suppress(FAILING_EMAIL)
        hourly = digest_hourly_job.execute_in_process(
            partition_key="2026-02-08-08:00", instance=instance, resources=build_resources(env)
        )
        first = digest_send_for_user_job.execute_in_process(
            run_config=dg.RunConfig(ops={SEND_FOR_USER_OP: DigestSendForUserConfig(user_id="u-first")}),
            instance=instance,
            resources=build_resources(env),
        )
        assert hourly.success and first.success
        # the runs really handled the secret content, the addresses and a provider error
        assert len(fake.sent) == 2
        assert all(SECRET_NOTE in (d.text or "") for d in fake.sent)
        logs = _log_text(instance, hourly.run_id) + _log_text(instance, first.run_id)

    engine = create_db_engine(app_url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        failed = conn.execute(
            sa.select(t.note_digests.c.error_json).where(t.note_digests.c.status == "failed")
        ).scalar_one()
    engine.dispose()
    # the provider's message is kept for operators in the database, without the address…
    assert "suppression list" in failed["message"] and FAILING_EMAIL not in failed["message"]

    assert "sent" in logs and "failed_digest_ids" in logs  # …while the log has counts and ids
    for secret in (
        SECRET_NOTE,
        "hunter2",
        SECRET_TITLE,
        "Zanzibar",
        "Marguerite",
        "Secretname",
        "Hidden Vault Name",
        FAILING_EMAIL,
        OK_EMAIL,
        FIRST_EMAIL,
        "private-mail.test",
        KEY_B64,
        KEY.hex(),
        API_KEY,
    ):
        assert secret not in logs, f"{secret!r} leaked into the event log"
