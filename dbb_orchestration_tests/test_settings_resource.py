"""SettingsResource: what the Dagster UI shows about the settings, and what a run then reads.

The location's resources bind every variable its environment sets as ``dg.EnvVar`` (shown by name)
and show the defaults of the others; ``Settings.from_env`` still parses and validates every value when
a run starts (behaviour §12). These tests set the process environment on purpose: reading it is
what they test (the rest of the suite passes explicit overrides).
"""

from __future__ import annotations

from typing import Any

import dagster as dg
import pytest

# The code location's snapshot: what the webserver's resource page is built from.
from dagster._core.remote_representation.external_data import (
    RepositorySnap,
    ResourceConfigEnvVarSnap,
    ResourceSnap,
)
from dagster._serdes import serialize_value

from dbb_orchestration.config import DEFAULT_FROM, Settings, SettingsError
from dbb_orchestration.definitions import build_resources, make_definitions
from dbb_orchestration.resources import SettingsResource

SECRET_KEY = "re_do_not_show_1234567890"
DB_URL = "sqlite:///settings-resource-test.sqlite"  # never opened: the tests only read settings


@pytest.fixture
def environ(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The process environment with every setting unset (whatever the shell running the tests has)."""
    for name in SettingsResource.variable_names():
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _settings_snap(defs: dg.Definitions) -> ResourceSnap:
    snap = RepositorySnap.from_def(defs.get_repository_def())
    [settings] = [r for r in snap.resources if r.name == "settings"]
    return settings


@dg.op
def read_settings(settings: SettingsResource) -> dict[str, Any]:
    s = settings.get()
    return {"database_url": s.database_url, "rate": s.email_rate_limit_per_second, "from": s.resend_from}


@dg.job
def settings_job() -> None:
    read_settings()


def _run(run_config: dict[str, Any] | None = None) -> dg.ExecuteInProcessResult:
    defs = dg.Definitions(jobs=[settings_job], resources=build_resources())
    return defs.resolve_job_def("settings_job").execute_in_process(
        run_config=run_config, raise_on_error=False
    )


def _run_error(result: dg.ExecuteInProcessResult) -> str:
    assert not result.success
    failures = [e for e in result.all_events if e.event_type_value in ("STEP_FAILURE", "RUN_FAILURE")]
    return " ".join(str(e.event_specific_data) for e in failures)


def test_the_resource_page_shows_set_variables_by_name_and_defaults_otherwise(
    environ: pytest.MonkeyPatch,
) -> None:
    environ.setenv("DATABASE_URL", DB_URL)
    environ.setenv("RESEND_API_KEY", SECRET_KEY)
    environ.setenv("EMAIL_RATE_LIMIT_PER_SECOND", "7")

    defs = make_definitions()
    settings = _settings_snap(defs)

    values = settings.configured_values
    for name in ("database_url", "resend_api_key", "email_rate_limit_per_second"):
        assert values[name] == ResourceConfigEnvVarSnap(name=name.upper()), name
    assert values["resend_from"] == f'"{DEFAULT_FROM}"'  # unset: the default, visible
    assert values["digest_users_per_step"] == '"10000"'
    assert values["resend_reply_to"] == "null"
    # Every field is described, starting with the variable it holds.
    descriptions = {f.name: f.description or "" for f in settings.config_field_snaps}
    assert set(descriptions) >= {n.lower() for n in SettingsResource.variable_names()}
    for name in SettingsResource.variable_names():
        assert descriptions[name.lower()].startswith(name), name
    # The secret's value appears nowhere in what the location hands to the UI.
    assert SECRET_KEY not in serialize_value(RepositorySnap.from_def(defs.get_repository_def()))


def test_the_launchpad_scaffold_shows_the_bindings_and_a_run_reads_them_when_it_starts(
    environ: pytest.MonkeyPatch,
) -> None:
    environ.setenv("DATABASE_URL", DB_URL)
    environ.setenv("EMAIL_RATE_LIMIT_PER_SECOND", "7")
    job = make_definitions().resolve_job_def("digest_hourly_job")
    resources = job.run_config_schema.config_type.fields["resources"].default_value
    scaffold = resources["settings"]["config"]
    assert scaffold["database_url"] == {"env": "DATABASE_URL"}
    assert scaffold["email_rate_limit_per_second"] == {"env": "EMAIL_RATE_LIMIT_PER_SECOND"}
    assert scaffold["resend_from"] == DEFAULT_FROM
    assert scaffold["resend_api_key"] is None

    environ.setenv("EMAIL_RATE_LIMIT_PER_SECOND", "9")  # changed after the location loaded
    result = _run()
    assert result.success
    assert result.output_for_node("read_settings") == {
        "database_url": DB_URL,
        "rate": 9.0,
        "from": DEFAULT_FROM,
    }

    # Editing one value in the launchpad starts from the scaffold: the other bindings stay.
    edited = {**scaffold, "resend_from": "ops@example.com"}
    result = _run({"resources": {"settings": {"config": edited}}})
    assert result.output_for_node("read_settings") == {
        "database_url": DB_URL,
        "rate": 9.0,
        "from": "ops@example.com",
    }


def test_a_bad_or_missing_value_fails_the_run_naming_the_variable(environ: pytest.MonkeyPatch) -> None:
    assert "DATABASE_URL is not set" in _run_error(_run())

    environ.setenv("DATABASE_URL", DB_URL)
    environ.setenv("EMAIL_RATE_LIMIT_PER_SECOND", "fast")
    assert "EMAIL_RATE_LIMIT_PER_SECOND must be a number, got 'fast'" in _run_error(_run())

    # Set when the location loaded, gone when the run starts: Dagster refuses the run's config, naming it.
    job = dg.Definitions(jobs=[settings_job], resources=build_resources()).resolve_job_def("settings_job")
    environ.delenv("EMAIL_RATE_LIMIT_PER_SECOND")
    with pytest.raises(dg.DagsterInvalidConfigError, match='variable "EMAIL_RATE_LIMIT_PER_SECOND"'):
        job.execute_in_process()


def test_overrides_win_over_the_environment_and_unknown_names_are_refused(
    environ: pytest.MonkeyPatch,
) -> None:
    environ.setenv("DATABASE_URL", "sqlite:///from-the-environment.sqlite")
    resource = SettingsResource.from_environment({"DATABASE_URL": DB_URL, "RESEND_FROM": "a@example.com"})
    assert (resource.database_url, resource.resend_from) == (DB_URL, "a@example.com")
    assert resource.get().database_url == DB_URL

    with pytest.raises(SettingsError, match="not a setting: RESEND_FORM"):
        SettingsResource.from_environment({"DATABASE_URL": DB_URL, "RESEND_FORM": "a@example.com"})


def test_the_visible_defaults_are_the_settings_defaults() -> None:
    resource = SettingsResource.from_environment({"DATABASE_URL": DB_URL}, environ={})
    assert resource.get() == Settings.from_env({"DATABASE_URL": DB_URL})
    assert resource.resend_api_key is None and resource.misnamed_content_key_variables == []


def test_a_resource_used_outside_a_run_reads_its_bindings(environ: pytest.MonkeyPatch) -> None:
    environ.setenv("DATABASE_URL", DB_URL)
    environ.setenv("SEQUENCE_EMAIL_DRY_RUN", "yes")
    resource = SettingsResource.from_environment()
    assert isinstance(resource.database_url, dg.EnvVar)
    settings = resource.get()
    assert (settings.database_url, settings.sequence_email_dry_run) == (DB_URL, True)


def test_a_misnamed_content_key_is_listed_by_name_and_refused(environ: pytest.MonkeyPatch) -> None:
    environ.setenv("DATABASE_URL", DB_URL)
    environ.setenv("CONTENT_ENCRYPTION_KEY_V11", "c2VjcmV0")
    environ.setenv("CONTENT_ENCRYPTION_KEY_V12", "  ")  # blank: ignored, as Settings.from_env does
    resource = SettingsResource.from_environment()
    assert resource.misnamed_content_key_variables == ["CONTENT_ENCRYPTION_KEY_V11"]
    with pytest.raises(SettingsError, match="CONTENT_ENCRYPTION_KEY_V11 is not a supported key variable"):
        resource.get()
    assert "c2VjcmV0" not in serialize_value(_settings_snap(make_definitions()))


class _Recording(dict[str, str]):
    """A mapping that remembers which variables were looked up."""

    def __init__(self, values: dict[str, str]) -> None:
        super().__init__(values)
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return super().__getitem__(key)


def test_the_resource_has_a_field_for_exactly_the_variables_settings_reads() -> None:
    env = _Recording({"DATABASE_URL": DB_URL})
    Settings.from_env(env)
    assert env.read == set(SettingsResource.variable_names())
