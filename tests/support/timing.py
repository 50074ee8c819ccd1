"""Per-call costs that are steady enough to assert a bound on."""

from __future__ import annotations

import time
from collections.abc import Callable


def us_per_call(fn: Callable[[], object], calls: int) -> float:
    """Microseconds per call of `calls` calls in a row."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def best_us_per_call(fn: Callable[[], object], calls: int, repeats: int = 5) -> float:
    """The fastest of `repeats` runs: other work on the machine only ever adds time, so the
    minimum is the figure that does not wobble with the load of the test run."""
    return min(us_per_call(fn, calls) for _ in range(repeats))
