"""Email: rendering (shared Jinja environment, base layout, CSS inlining) and sending (provider interface)."""
