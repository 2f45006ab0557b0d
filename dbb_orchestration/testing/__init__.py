"""Test and demo support: loopback fakes of Resend and Notion, and row factories.

The fakes are imported lazily so ``import dbb_orchestration.testing.factories`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dbb_orchestration.testing.fake_notion import FakeNotion, NotionRequest
    from dbb_orchestration.testing.fake_resend import FakeResend, ResendDelivery, ResendRequest

__all__ = ["FakeNotion", "FakeResend", "NotionRequest", "ResendDelivery", "ResendRequest"]

_LAZY = {
    "FakeNotion": "dbb_orchestration.testing.fake_notion",
    "NotionRequest": "dbb_orchestration.testing.fake_notion",
    "FakeResend": "dbb_orchestration.testing.fake_resend",
    "ResendDelivery": "dbb_orchestration.testing.fake_resend",
    "ResendRequest": "dbb_orchestration.testing.fake_resend",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
