"""Operator tooling: failure alerting and instance checks."""
