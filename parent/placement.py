"""Where a VM's threads run: its vCPU on one CPU, its vionet workers on the others.

A vionet worker woken by its guest's kick competes with the vCPU that kicked it: on the same
CPU it waits until the vCPU halts (measured here: 110-200 us per guest->host ping, on a kernel
that packs wake-ups onto the waker's CPU), and the vCPU then evicts the worker's caches. So
each VM gets a home CPU for its vCPU thread, chosen round-robin over the CPUs vmd may use so
that VMs spread out, and its workers may run anywhere but there. QEMU's other threads (the
main loop, which turns a worker's interrupt eventfd into the guest's interrupt) stay free.
With fewer than two CPUs there is nothing to separate and nothing is pinned.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

log = logging.getLogger("vmd.placement")


@dataclass(frozen=True)
class Placement:
    vcpus: frozenset[int]  # CPUs for the VM's vCPU threads
    devices: frozenset[int]  # CPUs for its vionet workers


class Placer:
    """Hands out placements, spreading the vCPUs of successive VMs over the CPUs."""

    def __init__(self, cpus: Iterable[int] | None = None) -> None:
        self.cpus = sorted(os.sched_getaffinity(0) if cpus is None else set(cpus))
        self._next = 0

    def place(self) -> Placement | None:
        if len(self.cpus) < 2:
            return None
        home = self.cpus[self._next % len(self.cpus)]
        self._next += 1
        return Placement(frozenset({home}), frozenset(c for c in self.cpus if c != home))


def pin_threads(tids: Iterable[int], cpus: frozenset[int]) -> int:
    """Set the affinity of each thread; how many were set (a thread may be gone already)."""
    done = 0
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError as exc:  # the thread is gone, or not ours to move
            log.debug("affinity of thread %d: %s", tid, exc)
            continue
        done += 1
    return done


def process_threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return []


def pin_process(pid: int, cpus: frozenset[int]) -> int:
    """Every current thread of ``pid``; threads it creates later inherit the mask."""
    return pin_threads(process_threads(pid), cpus)


def vcpu_thread_ids(cpus_fast: object) -> list[int]:
    """Thread ids from QMP's ``query-cpus-fast`` answer (ignoring anything malformed)."""
    tids: list[int] = []
    if isinstance(cpus_fast, list):
        for cpu in cpus_fast:
            tid = cpu.get("thread-id") if isinstance(cpu, dict) else None
            if isinstance(tid, int) and tid > 0:
                tids.append(tid)
    return tids
