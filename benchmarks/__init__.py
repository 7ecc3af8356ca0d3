"""Benchmarks (python -m benchmarks.sampling)."""
