"""The ``trio-jobs`` command line: serve, start, stop, status, tail, list, certs.

Entry point: :func:`trio_jobs.cli.main.main` (also ``python -m trio_jobs.cli``).
See docs/cli.md for every command, flag, default and exit code.
"""
