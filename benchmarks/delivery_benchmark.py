"""Digest delivery at scale: N due digests through the fake Resend enforcing the team rate limit.

    python benchmarks/delivery_benchmark.py [--admin-url postgresql://postgres@127.0.0.1:5432/postgres]
        [--users 10000] [--notes 5] [--rate 2] [--batch 100] [--concurrency 4] [--keep]

Creates a throwaway Postgres database from ``dbb_orchestration_tests/backend_schema.sql`` and fills
it with COPY: ``--users`` verified UTC users whose send hour is 08:00, each with one source,
``--notes`` AES-256-GCM documents and one ``scheduled`` digest of those notes for 2026-02-08 (so every
user is due at the 08:00 partition). Then it starts the loopback fake Resend with a team-wide rate
limit of ``--rate`` requests/second (429 with ``retry-after`` beyond it, counted) and runs
:func:`~dbb_orchestration.digests.send.send_due_digests` for the partition with the production sender
(:func:`dbb_orchestration.resources.resend_sender`: the Postgres team pacer at ``--rate``, request
timeout, retries, circuit breaker) and ``--batch`` digests per batch request. Prints the time to
deliver all, the requests the fake received, the 429s it answered, the emails it accepted and the
digests recorded ``sent``; then runs the partition again (nothing to send) and drops the database
unless ``--keep``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import sqlalchemy as sa
from _throwaway import throwaway_database

from dbb_orchestration.config import Settings
from dbb_orchestration.content import ContentKeyring, encode_content
from dbb_orchestration.db.engine import create_db_engine
from dbb_orchestration.digests.send import send_due_digests
from dbb_orchestration.resources import resend_sender
from dbb_orchestration.testing.fake_resend import FakeResend

KEY = bytes(range(11, 43))
HOUR = datetime(2026, 2, 8, 8, tzinfo=UTC)
DAY = datetime(2026, 2, 8, tzinfo=UTC)


def seed(conn: psycopg.Connection[Any], users: int, notes: int) -> None:
    keyring = ContentKeyring.from_keys({1: KEY})
    encoded = [encode_content(f"# Note {n}\n\nSpaced repetition, note {n}. " * 4, keyring) for n in range(20)]
    created = (HOUR - timedelta(days=60)).replace(tzinfo=None).isoformat()
    stamp = (HOUR - timedelta(days=30)).isoformat()
    with conn.cursor() as cur:
        with cur.copy(
            'COPY "user" (id, name, email, email_verified, created_at, updated_at) FROM STDIN'
        ) as cp:
            for i in range(users):
                cp.write_row(
                    (f"user-{i:07d}", f"Bench User {i}", f"user{i}@bench.test", True, created, created)
                )
        with cur.copy("COPY user_settings (user_id, timezone, preferred_send_hour) FROM STDIN") as cp:
            for i in range(users):
                cp.write_row((f"user-{i:07d}", "UTC", 8))
        with cur.copy(
            "COPY integration_connections (id, user_id, kind, status, display_name, account_external_id,"
            " created_at, updated_at) FROM STDIN"
        ) as cp:
            for i in range(users):
                cp.write_row(
                    (i + 1, f"user-{i:07d}", "obsidian", "active", f"Vault {i}", f"ext-{i}", stamp, stamp)
                )
        with cur.copy(
            "COPY documents (id, user_id, connection_id, external_id, title, content_ciphertext, content_iv,"
            " content_alg, content_key_version, content_hash, content_size_bytes, last_synced_at) FROM STDIN"
        ) as cp:
            for i in range(users):
                for k in range(notes):
                    enc = encoded[(i + k) % len(encoded)]
                    cp.write_row(
                        (
                            i * notes + k + 1, f"user-{i:07d}", i + 1, f"doc-{k}", f"Note {k}", enc.ciphertext,
                            enc.iv, enc.alg, enc.key_version, enc.content_hash, enc.size_bytes, stamp,
                        )
                    )  # fmt: skip
        with cur.copy(
            "COPY note_digests (id, user_id, scheduled_for, status, payload_json, created_at, updated_at)"
            " FROM STDIN"
        ) as cp:
            for i in range(users):
                payload = json.dumps({"source": "bench"})
                cp.write_row(
                    (
                        i + 1,
                        f"user-{i:07d}",
                        DAY.isoformat(),
                        "scheduled",
                        payload,
                        DAY.isoformat(),
                        DAY.isoformat(),
                    )
                )
        with cur.copy(
            "COPY note_digest_items (note_digest_id, document_id, position, content_hash_at_send) FROM STDIN"
        ) as cp:
            for i in range(users):
                for k in range(notes):
                    cp.write_row(
                        (i + 1, i * notes + k + 1, k + 1, encoded[(i + k) % len(encoded)].content_hash)
                    )
        for table in ("integration_connections", "documents", "note_digests"):
            sql = f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))"  # noqa: S608 - constants
            cur.execute(sql)
    conn.commit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--admin-url",
        default=os.environ.get("DBB_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
    )
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--notes", type=int, default=5)
    parser.add_argument("--rate", type=float, default=2.0)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)

    with throwaway_database(args.admin_url, keep=args.keep) as url:
        with psycopg.connect(url) as conn:
            started = time.perf_counter()
            seed(conn, args.users, args.notes)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")
        print(
            f"seeded {args.users:,} due digests × {args.notes} notes in {time.perf_counter() - started:.1f} s"
        )
        with FakeResend(rate_limit_per_second=args.rate) as fake:
            settings = Settings.from_env(
                {
                    "DATABASE_URL": url,
                    "RESEND_API_KEY": "re_bench_team",
                    "RESEND_API_URL": fake.base_url,
                    "EMAIL_RATE_LIMIT_PER_SECOND": str(args.rate),
                    "EMAIL_BATCH_SIZE": str(args.batch),
                    "EMAIL_MAX_CONCURRENCY": str(args.concurrency),
                    "CONTENT_ENCRYPTION_KEY": base64.b64encode(KEY).decode(),
                    "DBB_NOW": (HOUR + timedelta(seconds=5)).isoformat(),
                }
            )
            engine = create_db_engine(url)
            for label in ("first run", "same partition again"):
                before = fake.requests_count
                cpu = time.process_time()
                started = time.perf_counter()
                report = send_due_digests(engine, resend_sender(settings), settings, HOUR, clock=settings.now)
                wall = time.perf_counter() - started
                cpu = time.process_time() - cpu
                print(f"\n== {label}: partition {HOUR.isoformat()}, team limit {args.rate:g} requests/s")
                print(
                    f"   time to deliver all: {wall:.1f} s wall, {cpu:.1f} s CPU (this process, fake included)"
                )
                print(
                    f"   report: due={report.due:,} sent={report.sent:,} failed={report.failed} "
                    f"skipped={dict(report.skipped)} not_due={dict(report.not_due)} batch requests={report.requests}"
                )
                print(
                    f"   fake Resend: requests={fake.requests_count - before:,} (total {fake.requests_count:,}), "
                    f"429s={fake.rate_limited}, emails accepted={len(fake.sent):,}"
                )
            times = [r.at for r in fake.requests]
            if len(times) > 1:
                print(f"   observed request rate: {(len(times) - 1) / (times[-1] - times[0]):.2f} requests/s")
            with engine.connect() as conn:
                recorded = conn.execute(
                    sa.text(
                        "SELECT count(*) FROM note_digests WHERE status = 'sent' AND payload_json ? 'provider_id'"
                    )
                ).scalar()
            print(f"\ndigests recorded sent with a provider id: {recorded:,}")
            engine.dispose()
            fake.raise_server_errors()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
