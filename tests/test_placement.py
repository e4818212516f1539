"""CPU placement: a VM's vCPU on its home CPU, its vionet workers on the others."""

from __future__ import annotations

import os
import threading

from parent.placement import Placer, pin_process, vcpu_thread_ids


def test_vms_spread_over_cpus_and_workers_avoid_their_vcpu() -> None:
    placer = Placer([0, 1, 2])
    first, second, third, fourth = (placer.place() for _ in range(4))
    assert first is not None and second is not None and third is not None
    assert fourth is not None
    assert [sorted(p.vcpus) for p in (first, second, third, fourth)] == [[0], [1], [2], [0]]
    assert sorted(first.devices) == [1, 2]
    assert sorted(second.devices) == [0, 2]
    for p in (first, second, third):
        assert p.vcpus.isdisjoint(p.devices)


def test_one_cpu_means_no_pinning() -> None:
    assert Placer([3]).place() is None


def test_vcpu_thread_ids_ignore_malformed_answers() -> None:
    answer = [{"cpu-index": 0, "thread-id": 4242}, {"thread-id": "x"}, {"thread-id": -1},
              "junk", {"thread-id": 77}]
    assert vcpu_thread_ids(answer) == [4242, 77]
    assert vcpu_thread_ids({"not": "a list"}) == []


def test_pin_process_covers_every_thread_and_new_threads_inherit() -> None:
    before = os.sched_getaffinity(0)
    target = frozenset({min(before)})
    started = threading.Event()
    release = threading.Event()

    def park() -> None:
        started.set()
        release.wait(10)

    worker = threading.Thread(target=park)
    worker.start()
    started.wait(10)
    try:
        assert pin_process(os.getpid(), target) >= 2
        assert os.sched_getaffinity(worker.native_id or 0) == target
        seen: list[set[int]] = []
        later = threading.Thread(target=lambda: seen.append(os.sched_getaffinity(0)))
        later.start()
        later.join()
        assert seen == [set(target)]
    finally:
        release.set()
        worker.join()
        pin_process(os.getpid(), frozenset(before))
    assert os.sched_getaffinity(0) == before
