"""Tests of trio_jobs.rpc."""
