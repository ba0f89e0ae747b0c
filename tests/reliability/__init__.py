"""Reliability tests (issue 8): faults, hostile jobs, load, hostile connections, fuzzing."""
