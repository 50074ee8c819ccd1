"""Which CPU each worker of `proxy serve --workers N` runs on (`server.worker_affinity`).

With "auto", when the N workers are as many as the CPUs this process may use (a machine or a
cpuset of its own), worker i runs on the i-th of them only: the kernel no longer moves workers
between CPUs, or lets one preempt another where a CPU was free, and each keeps its caches. On 2
cores (bench/scale.py) that served ~7% more calls per second than letting them move. With fewer
workers than CPUs, or a CPU quota without a cpuset (a container limited to 2 of 64 CPUs: its
mask is all 64), nothing is pinned, since those CPUs are shared with whatever else runs there.
"""

from __future__ import annotations

import contextlib
import os


def worker_cpus(setting: str, n: int) -> list[int] | None:
    """The CPU of each worker, by index; None: the kernel places them."""
    if setting != "auto" or not hasattr(os, "sched_getaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    return cpus if len(cpus) == n > 1 else None


def pin(cpu: int) -> None:
    """This process (and the threads it starts later) on `cpu` only."""
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {cpu})
