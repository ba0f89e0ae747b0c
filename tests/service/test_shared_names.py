"""Names the service shares with other layers, each layer keeping its own copy.

security/ may not import the worker (DESIGN §1), so the policy spells the limit names out
itself (``security.LIMIT_FIELDS``), while the service derives them from ``worker.Limits``.
The client's half (``calls.py``) keeps its own trailing-metadata key. Nothing at run time
compares the copies: a limit added to ``Limits`` but not to the policy would have no cap in
any policy file, and a renamed key would drop every follower's final status. These tests
hold the copies equal, in the same order.
"""

from __future__ import annotations

from dataclasses import fields

from trio_jobs import calls, security, service
from trio_jobs.security import policy
from trio_jobs.service import convert
from trio_jobs.v1 import jobs_pb2 as pb
from trio_jobs.worker import Limits


def test_the_policy_names_the_limits_the_worker_has() -> None:
    assert tuple(f.name for f in fields(Limits)) == convert.LIMIT_FIELDS
    assert security.LIMIT_FIELDS == policy.LIMIT_FIELDS  # the package's name is the module's
    assert convert.LIMIT_FIELDS == policy.LIMIT_FIELDS


def test_the_proto_carries_every_limit() -> None:
    """limits_to_proto and effective_limits go by these names on ResourceLimits."""
    assert tuple(f.name for f in pb.ResourceLimits.DESCRIPTOR.fields) == convert.LIMIT_FIELDS


def test_group_limits_are_limits() -> None:
    """StartJob builds the identity's group ``Limits(**{name: ...})`` from TOTAL_FIELDS."""
    assert set(policy.TOTAL_FIELDS) <= set(convert.LIMIT_FIELDS)


def test_client_and_service_agree_on_the_final_status_key() -> None:
    assert calls.FINAL_STATUS_KEY == service.FINAL_STATUS_KEY
