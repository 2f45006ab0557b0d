"""Weekly Notion sync (SPEC §11): pure page/block conversion in ``markdown`` and ``pages``."""
