"""Thin Prefect tasks over the library stages: retries, cache keys, tags, logs, artifacts."""
