"""Benchmarks: ./dev bench (see docs/benchmarks.md)."""
