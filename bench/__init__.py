"""Benchmarks: ``python -m bench <workload>`` (see bench.cli)."""
