"""Network namespaces the tests create and delete: every test packet stays inside one."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from contextlib import contextmanager

from pyroute2 import IPRoute, netns

_seq = itertools.count()


def new_name(prefix: str = "vmdt") -> str:
    return f"{prefix}-{os.getpid()}-{next(_seq)}"


@contextmanager
def created(prefix: str = "vmdt") -> Iterator[str]:
    """Create a namespace (lo up) and remove it afterwards, whatever happened inside."""
    name = new_name(prefix)
    netns.create(name)
    try:
        netns.pushns(name)
        try:
            with IPRoute() as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        finally:
            netns.popns()
        yield name
    finally:
        netns.remove(name)


@contextmanager
def entered(prefix: str = "vmdt") -> Iterator[str]:
    """Create a namespace and move this (single-threaded) test process into it meanwhile.

    Children started inside inherit it, so a parent under test creates its taps and bridges
    there and nowhere else.
    """
    with created(prefix) as name:
        netns.pushns(name)
        try:
            yield name
        finally:
            netns.popns()
