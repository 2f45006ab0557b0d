"""The paced, retrying Notion API wrapper, through the real notion-client against FakeNotion."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dbb_orchestration.config import SettingsError
from dbb_orchestration.notion_sync.client import (
    NotionApi,
    NotionNotFound,
    NotionRequestError,
    NotionResource,
    NotionUnauthorized,
    make_sdk_client,
    notion_retry_policy,
    parse_retry_after,
    retry_delay,
)
from dbb_orchestration.resources import SettingsResource
from dbb_orchestration.testing import FakeNotion

TOKEN = "secret_client_tok"
DB = "db-client"
DS = "ds-client"
POLICY = notion_retry_policy()


# --- pure rules ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("3", 3.0), (" 1.5 ", 1.5), ("0", 0.0), (None, None), ("", None), ("-1", None), ("soon", None),
     ("Wed, 21 Oct 2015 07:28:00 GMT", None), ("nan", None), ("inf", None)],
)  # fmt: skip
def test_parse_retry_after(raw: str | None, expected: float | None) -> None:
    assert parse_retry_after(raw) == expected


def test_retry_delay_backoff_doubles_from_400ms_and_is_capped() -> None:
    delays = [retry_delay(503, None, attempt, notion_retry_policy(max_retries=8)) for attempt in range(8)]
    assert delays == [0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0, 10.0]


def test_retry_delay_honours_retry_after_on_429_as_sent_up_to_the_maximum_wait() -> None:
    assert retry_delay(429, 2.0, 0, POLICY) == 2.0
    assert retry_delay(429, 30.0, 3, POLICY) == 30.0  # not cut to the back-off cap
    assert retry_delay(429, 300.0, 0, POLICY) == 300.0  # the default maximum
    assert retry_delay(429, 301.0, 0, POLICY) == 300.0
    assert retry_delay(429, 90.0, 0, notion_retry_policy(max_retry_after=60.0)) == 60.0
    assert retry_delay(429, 5.0, 0, notion_retry_policy(max_retry_after=0.0)) == 0.0
    assert retry_delay(429, None, 2, POLICY) == 1.6  # no header: the back-off
    assert retry_delay(503, 5.0, 0, POLICY) == 0.4  # Retry-After only counts on 429


def test_retry_delay_stops_after_five_retries_and_for_other_statuses() -> None:
    assert retry_delay(429, 1.0, 4, POLICY) == 1.0
    assert retry_delay(429, 1.0, 5, POLICY) is None
    assert retry_delay(0, None, 0, POLICY) == 0.4  # timeouts / transport errors are retried
    for status in (400, 401, 403, 404, 409):
        assert retry_delay(status, None, 0, POLICY) is None


# --- against the fake ----------------------------------------------------------------------------


class Sleeps:
    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


class CountingLimiter:
    def __init__(self) -> None:
        self.acquired = 0

    def acquire(self) -> float:
        self.acquired += 1
        return 0.0


@pytest.fixture
def fake() -> Iterator[FakeNotion]:
    with FakeNotion(tokens=[TOKEN]) as server:
        server.add_database(DB, [DS], "Client tests")
        server.add_page(DS, "page-1", "One", "2026-02-08T10:00:00Z")
        yield server
    server.raise_server_errors()


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def limiter() -> CountingLimiter:
    return CountingLimiter()


@pytest.fixture
def api(fake: FakeNotion, sleeps: Sleeps, limiter: CountingLimiter) -> Iterator[NotionApi]:
    with NotionApi(make_sdk_client(TOKEN, fake.base_url), rate_limiter=limiter, sleep=sleeps) as notion:  # type: ignore[arg-type]
        yield notion


def test_429_with_retry_after_then_success(
    fake: FakeNotion, api: NotionApi, sleeps: Sleeps, limiter: CountingLimiter
) -> None:
    fake.fail_next("/v1/databases/", status=429, count=1, retry_after=1)

    database = api.retrieve_database(DB)

    assert database["data_sources"] == [{"id": DS, "name": "Client tests"}]
    assert sleeps.calls == [1.0]
    # One request per attempt: the SDK's own retry is off, so nothing stacks on ours.
    assert [r.status for r in fake.requests] == [429, 200]
    assert (api.requests, api.retries, limiter.acquired) == (2, 1, 2)


def test_retry_after_of_30_seconds_waits_30_seconds(fake: FakeNotion, api: NotionApi, sleeps: Sleeps) -> None:
    fake.fail_next("/v1/databases/", status=429, count=2, retry_after=30)

    api.retrieve_database(DB)

    assert sleeps.calls == [30.0, 30.0]
    assert api.retries == 2


def test_retry_after_beyond_the_maximum_wait_is_bounded(fake: FakeNotion, sleeps: Sleeps) -> None:
    fake.fail_next("/v1/databases/", status=429, count=1, retry_after=3600)
    policy = notion_retry_policy(max_retry_after=120.0)
    with NotionApi(make_sdk_client(TOKEN, fake.base_url), sleep=sleeps, policy=policy) as api:
        api.retrieve_database(DB)

    assert sleeps.calls == [120.0]


def test_429_without_retry_after_backs_off_from_400ms(
    fake: FakeNotion, api: NotionApi, sleeps: Sleeps
) -> None:
    fake.fail_next("/v1/data_sources/", status=429, count=3, retry_after=None)

    response = api.query_data_source(DS, {"page_size": 100})

    assert [r["id"] for r in response["results"]] == ["page-1"]
    assert sleeps.calls == [0.4, 0.8, 1.6]


def test_gives_up_after_five_retries(fake: FakeNotion, api: NotionApi, sleeps: Sleeps) -> None:
    fake.fail_next("/v1/blocks/", status=503, count=10)

    with pytest.raises(NotionRequestError) as caught:
        api.list_block_children("page-1")

    assert caught.value.status == 503
    assert caught.value.code == "service_unavailable"
    assert caught.value.attempts == 6
    assert fake.request_count("/v1/blocks/") == 6
    assert sleeps.calls == [0.4, 0.8, 1.6, 3.2, 6.4]


def test_401_is_not_retried(fake: FakeNotion, api: NotionApi, sleeps: Sleeps) -> None:
    fake.revoke_token(TOKEN)

    with pytest.raises(NotionUnauthorized) as caught:
        api.retrieve_database(DB)

    assert (caught.value.status, caught.value.code, caught.value.attempts) == (401, "unauthorized", 1)
    assert fake.request_count() == 1
    assert sleeps.calls == []
    assert TOKEN not in str(caught.value) and TOKEN not in str(caught.value.as_json())


def test_404_is_not_retried(fake: FakeNotion, api: NotionApi, sleeps: Sleeps) -> None:
    with pytest.raises(NotionNotFound) as caught:
        api.list_block_children("no-such-page")

    assert caught.value.status == 404
    assert fake.request_count() == 1
    assert sleeps.calls == []


def test_validation_error_is_not_retried(fake: FakeNotion, api: NotionApi) -> None:
    with pytest.raises(NotionRequestError) as caught:
        api.query_data_source(DS, {"page_size": 500})

    assert (caught.value.status, caught.value.code) == (400, "validation_error")
    assert fake.request_count() == 1


def test_server_error_then_success(fake: FakeNotion, api: NotionApi, sleeps: Sleeps) -> None:
    fake.fail_next("/v1/blocks/", status=500, count=2)

    assert api.list_block_children("page-1")["results"] == []
    assert sleeps.calls == [0.4, 0.8]


def test_transport_error_is_retried(sleeps: Sleeps) -> None:
    # Nothing listens on port 9 of 127.0.0.1: every attempt is refused.
    api = NotionApi(
        make_sdk_client(TOKEN, "http://127.0.0.1:9"), sleep=sleeps, policy=notion_retry_policy(max_retries=2)
    )
    with api, pytest.raises(NotionRequestError) as caught:
        api.retrieve_database(DB)

    assert (caught.value.status, caught.value.code, caught.value.attempts) == (0, "transport_error", 3)
    assert sleeps.calls == [0.4, 0.8]


def test_make_sdk_client_rejects_an_empty_token() -> None:
    with pytest.raises(ValueError, match="token"):
        make_sdk_client("", "http://127.0.0.1:9")


def test_resource_builds_a_client_for_the_configured_url(fake: FakeNotion) -> None:
    resource = NotionResource(
        settings=SettingsResource.from_environment(
            {
                "DATABASE_URL": "sqlite://",
                "NOTION_API_URL": fake.base_url,
                "NOTION_REQUESTS_PER_SECOND": "0",
            }
        )
    )

    with resource.open(TOKEN) as api:
        assert api.retrieve_database(DB)["id"] == DB
        assert api.rate_limiter.interval == 0.0
        assert api.policy.max_retry_after == 300.0  # NOTION_MAX_RETRY_WAIT_SECONDS' default

    [request] = fake.requests
    assert request.token == TOKEN
    assert request.notion_version == "2025-09-03"


def test_resource_takes_the_maximum_retry_wait_from_the_settings(fake: FakeNotion) -> None:
    env = {"DATABASE_URL": "sqlite://", "NOTION_API_URL": fake.base_url}
    resource = NotionResource(
        settings=SettingsResource.from_environment({**env, "NOTION_MAX_RETRY_WAIT_SECONDS": "45"})
    )
    with resource.open(TOKEN) as api:
        assert api.policy.max_retry_after == 45.0

    bad = NotionResource(
        settings=SettingsResource.from_environment({**env, "NOTION_MAX_RETRY_WAIT_SECONDS": "-1"})
    )
    with pytest.raises(SettingsError, match="NOTION_MAX_RETRY_WAIT_SECONDS"):
        bad.client(TOKEN)


def test_resource_paces_connections() -> None:
    resource = NotionResource(settings=SettingsResource.from_environment({"DATABASE_URL": "sqlite://"}))
    sleeps = Sleeps()
    now = [100.0]

    assert resource.pause_between_connections(2.0, clock=lambda: now[0], sleep=sleeps) == 0.0  # first one
    resource.connection_finished(clock=lambda: now[0])
    now[0] = 100.5
    assert resource.pause_between_connections(2.0, clock=lambda: now[0], sleep=sleeps) == 1.5
    now[0] = 103.0
    assert resource.pause_between_connections(2.0, clock=lambda: now[0], sleep=sleeps) == 0.0
    assert resource.pause_between_connections(0.0, clock=lambda: 100.0, sleep=sleeps) == 0.0
    assert sleeps.calls == [1.5]
