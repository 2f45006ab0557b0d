"""Assembles the code location's Definitions from each workflow. Nothing else lives here."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dagster as dg

from dbb_orchestration.digests import defs as digests_defs
from dbb_orchestration.notion_sync import defs as notion_sync_defs
from dbb_orchestration.notion_sync.client import NotionResource
from dbb_orchestration.operations import failure_sensor
from dbb_orchestration.resources import DatabaseResource, EmailResource, SettingsResource
from dbb_orchestration.sequences import defs as sequences_defs


def build_resources(overrides: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The resources every job uses. Settings the environment sets are bound as ``dg.EnvVar`` (the UI
    shows their names); ``overrides`` win over the environment (tests, the demo)."""
    settings = SettingsResource.from_environment(overrides)
    return {
        "settings": settings,
        "database": DatabaseResource(settings=settings),
        "email": EmailResource(settings=settings),
        "notion": NotionResource(settings=settings),
        **digests_defs.io_managers(),
    }


def make_definitions(overrides: Mapping[str, str] | None = None) -> dg.Definitions:
    return dg.Definitions.merge(
        dg.Definitions(resources=build_resources(overrides)),
        failure_sensor.definitions,
        digests_defs.definitions,
        sequences_defs.definitions,
        notion_sync_defs.definitions,
    )


defs = make_definitions()
