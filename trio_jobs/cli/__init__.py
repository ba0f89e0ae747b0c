"""The ``trio-jobs`` command line: serve, start, stop, status, tail, list, certs.

Entry point: :func:`trio_jobs.cli.main.run`, the console script (also ``python -m
trio_jobs.cli``); :func:`trio_jobs.cli.main.main` runs a command and returns its status.
See docs/cli.md for every command, flag, default and exit code.
"""
