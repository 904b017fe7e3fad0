"""Prefect orchestration of the DVC pipeline: flows, the DVC stage runner, and a single-process scheduler."""
