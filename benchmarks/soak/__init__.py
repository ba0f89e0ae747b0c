"""Soak and fuzz runner for trio-jobs (issue 8): ``python -m benchmarks.soak --help``."""
