"""End-to-end benchmarks of trio-jobs: the figures a user compares (docs/benchmarks.md).

Run ``python -m benchmarks.e2e [--quick]`` (or ``./dev bench e2e``).
"""
