"""Daily Brain Bits background jobs as a Dagster code location."""
