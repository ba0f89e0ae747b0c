"""The in-process server fixtures of test_service.py, for the other service tests too."""

from .test_service import pki, server  # noqa: F401 (fixtures)
