"""Keeping an engine replica's CPU cores to it.

On a small CPU machine the engine, the HTTP proxy, the ingress, the replica's own asyncio side and Ray's
processes share a few cores, and any of them landing on the core of a decode step stalls it (2-vCPU EPYC, paired
rounds: served batch 1 at 0.74-0.85x of the engine alone, 0.85-0.91x with the replica on a reserved core, and 16
streams +22-25 %: docs/BENCHMARKS.md section 4). A pool's `cpu_cores` reserves cores: each
replica, every thread of it (the engine thread, the torch threads it starts, and the asyncio side that streams its
chunks), runs on its slice of them; the ingress, and a cluster started by `helix serve`, keep to the other cores.

Linux only (sched_setaffinity); elsewhere `cpu_cores` is reported and ignored.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

logger = logging.getLogger(__name__)
SUPPORTED = hasattr(os, "sched_setaffinity")


def replica_cores(cores: list[int], local_rank: int, threads: int) -> list[int]:
    """This replica's slice of its pool's cores: `threads` of them, the `local_rank`-th slice on its node (replicas
    of a pool on one node get disjoint slices while the list lasts, then wrap around, with a warning)."""
    if len(cores) <= threads:
        if len(cores) < threads:
            logger.warning("cpu_cores %s: fewer cores than torch_threads (%d)", cores, threads)
        return list(cores)
    if (local_rank + 1) * threads > len(cores):
        logger.warning("cpu_cores %s: replica %d on this node shares cores with another (one slice of %d per "
                       "replica)", cores, local_rank, threads)
    start = (local_rank * threads) % len(cores)
    return [cores[(start + i) % len(cores)] for i in range(threads)]


def move_process(cores: Iterable[int]) -> None:
    """Every thread of this process onto `cores` (threads started later inherit them from their starter). OSError
    (EINVAL) when none of them is allowed here, e.g. outside the container's cpuset."""
    cores = set(cores)
    for tid in _thread_ids():
        try:
            os.sched_setaffinity(tid, cores)
        except ProcessLookupError:  # the thread ended meanwhile
            pass


def keep_off(cores: Iterable[int]) -> set[int] | None:
    """This process onto the cores it may use except `cores`; the cores it now uses, or None (nothing changed)
    when no other core remains or the OS can't pin."""
    reserved = set(cores)
    if not SUPPORTED or not reserved:
        return None
    others = os.sched_getaffinity(0) - reserved
    if not others:
        logger.warning("cpu_cores %s leave no other core for this process; it stays where it is", sorted(reserved))
        return None
    move_process(others)
    return others


def current_cores() -> list[int] | None:
    """The cores the calling thread may run on (None where the OS can't tell)."""
    return sorted(os.sched_getaffinity(0)) if SUPPORTED else None


def _thread_ids() -> list[int]:
    return [int(tid) for tid in os.listdir("/proc/self/task")]
