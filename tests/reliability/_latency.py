"""The "other users stay served" bound, robust on a loaded 2-CPU machine.

A test measures another user's call latencies twice: a baseline (the server without the
attack) and during the attack, both in the same test. The attack passes if the p99 during it
is under ``P99_FLOOR`` or under ``P99_FACTOR`` times the baseline p99, whichever is larger:
the floor is the target on a quiet machine, the factor keeps the property ("the attack did
not hurt the others") when teammates' suites already slow the idle server down.

A single window of ~100 calls lasts well under a second, so one scheduler stall of the
shared machine can push its p99 over any bound. On a miss the measurement is therefore
taken once more (what is repeated is the test's choice: the whole baseline + attack pair, or
the window during the attack), and the test fails only if both attempts miss, with every
attempt's figures in the message. A real regression (an attack that stalls the server)
misses every time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import pytest

from .conftest import p99

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

P99_FLOOR: Final = 0.050
P99_FACTOR: Final = 2.0
ATTEMPTS: Final = 2  # the first, and one repeat on a miss


def figures(samples: Sequence[float]) -> str:
    ordered = sorted(samples)
    return (
        f"p50 {ordered[len(ordered) // 2] * 1000:.1f} ms, p99 {p99(ordered) * 1000:.1f} ms, "
        f"max {ordered[-1] * 1000:.1f} ms over {len(ordered)} calls"
    )


@dataclass(frozen=True, kw_only=True)
class Attempt:
    baseline: Sequence[float]  # the other user's latencies without the attack (seconds)
    during: Sequence[float]  # ... and during it
    note: str = ""  # anything else the test wants in the report (e.g. server RSS)

    @property
    def bound(self) -> float:
        return max(P99_FLOOR, P99_FACTOR * p99(self.baseline))

    @property
    def ok(self) -> bool:
        return p99(self.during) < self.bound

    def report(self) -> str:
        verdict = "within" if self.ok else "MISSED"
        note = f"; {self.note}" if self.note else ""
        return (
            f"baseline {figures(self.baseline)}; during {figures(self.during)}; "
            f"{verdict} the bound {self.bound * 1000:.1f} ms "
            f"(max({P99_FLOOR * 1000:.0f} ms, {P99_FACTOR:g} x baseline p99)){note}"
        )


async def assert_p99_within_bound(
    label: str, attempt: Callable[[int], Awaitable[Attempt]]
) -> list[Attempt]:
    """Run ``attempt(1)``; on a miss ``attempt(2)``; fail if both miss. Prints every
    attempt's figures (``pytest -s``) and returns the attempts."""
    done: list[Attempt] = []
    for number in range(1, ATTEMPTS + 1):
        result = await attempt(number)
        done.append(result)
        print(f"\n{label}, attempt {number}: {result.report()}")
        if result.ok:
            return done
    lines = "\n".join(f"  attempt {i}: {a.report()}" for i, a in enumerate(done, 1))
    pytest.fail(f"{label}: the other user's p99 missed its bound {len(done)} times:\n{lines}")
