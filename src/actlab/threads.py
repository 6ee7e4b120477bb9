"""How many threads to use, chosen at start-up from the cores that are free now.

torch and actlab's kernels share one OpenMP pool. With as many threads as cores, a parallel region lasts as
long as its slowest thread; on a machine where other processes keep the cores busy, one of our threads is
usually waiting for a time slice, and every region (a batch-1 decode step has a few hundred) waits with it:
measured on 2 cores with one competing process, a decode step took far longer than its fair share of the
machine predicts. Using only the cores that are idle avoids that; on a quiet machine nothing changes.

`configure()` runs before torch is imported (the command line calls it first): it samples /proc/stat for a
moment, sets OMP_NUM_THREADS to the idle cores (at least one) and, when other processes are busy, lets
waiting OpenMP threads sleep instead of spin (OMP_WAIT_POLICY=PASSIVE), so they give their core to the thread
that is behind. An explicit OMP_NUM_THREADS, ACTLAB_THREADS or OMP_WAIT_POLICY always wins. The choice is
made once per process: thread counts change the order of floating-point sums, so a run keeps one.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

SAMPLE_SECONDS = 0.2


@dataclass(frozen=True)
class ThreadChoice:
    cores: int
    busy: float  # cores kept busy by other processes during the sample
    threads: int
    passive: bool
    reason: str


def cores_available() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def busy_cores(seconds: float = SAMPLE_SECONDS) -> float | None:
    """Cores busy over the next `seconds` (all processes; this one is idle while it sleeps), or None where
    /proc/stat is not available."""
    def read() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as fh:
                fields = [int(x) for x in fh.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields[:8]), idle

    first = read()
    if first is None:
        return None
    time.sleep(seconds)
    second = read()
    total, idle = second[0] - first[0], second[1] - first[1]
    if total <= 0:
        return None
    return (1.0 - idle / total) * (os.cpu_count() or 1)  # /proc/stat's first line sums every CPU


def choose(busy: float | None, cores: int) -> ThreadChoice:
    if busy is None:
        return ThreadChoice(cores, 0.0, cores, False, "no load information: every core")
    free = max(1, min(cores, round(cores - busy)))
    contended = busy >= 0.5
    reason = (f"{busy:.1f} of {cores} cores busy with other work: {free} thread{'s' if free > 1 else ''}, "
              "waiting threads sleep" if contended else "quiet machine: every core")
    return ThreadChoice(cores, busy, free, contended, reason)


_chosen: ThreadChoice | None = None


def configure(log=None) -> ThreadChoice | None:
    """Choose the thread count and OpenMP wait policy for this process (before torch is imported)."""
    global _chosen
    if _chosen is not None:
        return _chosen
    explicit = os.environ.get("ACTLAB_THREADS") or os.environ.get("OMP_NUM_THREADS")
    if explicit:
        os.environ.setdefault("OMP_NUM_THREADS", explicit)
        _chosen = ThreadChoice(cores_available(), 0.0, int(explicit), os.environ.get("OMP_WAIT_POLICY") == "PASSIVE",
                               "set by the environment")
        return _chosen
    if "torch" in sys.modules:  # too late for the OpenMP runtime's settings; torch's own defaults stay
        return None
    choice = choose(busy_cores(), cores_available())
    os.environ["OMP_NUM_THREADS"] = str(choice.threads)
    if choice.passive:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if log is not None and choice.passive:
        log(f"threads: {choice.reason}")
    _chosen = choice
    return choice


def chosen() -> ThreadChoice | None:
    return _chosen
