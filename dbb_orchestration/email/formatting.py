"""Wording shared by every email (digests and sequences): counts and the names of a user's sources.

Pure functions: no database, no clock, no templates.
"""

from __future__ import annotations

import re

__all__ = ["SOURCE_SEPARATOR", "first_source_label", "plural", "source_label"]

SOURCE_SEPARATOR = " · "


def plural(count: int, word: str) -> str:
    """``plural(1, "note") == "1 note"``, ``plural(5, "note") == "5 notes"`` (also 0 → "0 notes")."""
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _names_product(name: str, product: str) -> bool:
    """True when ``name`` already says ``product`` as a word ("Obsidian Vault", "my notion space")."""
    return re.search(rf"(?<!\w){re.escape(product)}(?!\w)", name, re.IGNORECASE) is not None


def source_label(kind: str | None, name: str | None) -> str | None:
    """``notion`` + ``Study Notes`` → ``Notion · Study Notes``; ``obsidian`` → ``Obsidian`` (``Obsidian ·
    <name>`` when it has a display name). A display name that already names the kind is shown alone, so
    the kind never repeats (``obsidian`` + ``Obsidian Vault`` → ``Obsidian Vault``). Another kind is
    capitalised the same way; no kind → the name alone; neither → ``None`` (no label shown)."""
    clean_name = (name or "").strip()
    clean_kind = (kind or "").strip()
    if not clean_kind:
        return clean_name or None
    product = {"notion": "Notion", "obsidian": "Obsidian"}.get(clean_kind.lower(), clean_kind.capitalize())
    if not clean_name:
        return product
    if _names_product(clean_name, product):
        return clean_name
    return f"{product}{SOURCE_SEPARATOR}{clean_name}"


def first_source_label(kind: str | None, name: str | None) -> str | None:
    """The first digest's source wording (behaviour §8): ``obsidian`` → ``Obsidian``; ``notion`` + ``Study
    Notes`` → ``Notion (Study Notes)`` (``Notion`` without a display name); another kind → capitalised;
    no kind → ``None`` (the email then says "your notes"). A display name that already names the kind
    is shown alone (``Notion Team Wiki``)."""
    clean_kind = (kind or "").strip().lower()
    if not clean_kind:
        return None
    if clean_kind == "obsidian":
        return "Obsidian"
    product = "Notion" if clean_kind == "notion" else clean_kind.capitalize()
    clean_name = (name or "").strip()
    if clean_name and _names_product(clean_name, product):
        return clean_name  # "Notion Team Wiki", not "Notion (Notion Team Wiki)"
    return f"{product} ({clean_name})" if clean_name else product
