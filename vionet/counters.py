"""Named u64 counters for one device: packets, bytes and drops by reason."""

from __future__ import annotations

import enum
import threading

_U64 = (1 << 64) - 1
STANDARD = ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes")


class Counters:
    """Counters created on first use; the standard four always exist.

    Increments from the packet threads are plain dict updates (atomic enough under the GIL
    for one writer per name); :meth:`snapshot` copies under a lock for a consistent view.
    """

    __slots__ = ("_lock", "_values")

    def __init__(self) -> None:
        self._values: dict[str, int] = dict.fromkeys(STANDARD, 0)
        self._lock = threading.Lock()

    def add(self, name: str, n: int) -> None:
        values = self._values
        values[name] = (values.get(name, 0) + n) & _U64

    def inc(self, name: str) -> None:
        values = self._values
        values[name] = (values.get(name, 0) + 1) & _U64

    def drop(self, reason: str | enum.Enum, prefix: str = "") -> None:
        """Count a drop as ``<prefix>drop_<reason>`` (enum reasons by value)."""
        value = reason.value if isinstance(reason, enum.Enum) else reason
        self.inc(f"{prefix}drop_{value}")

    def get(self, name: str) -> int:
        return self._values.get(name, 0)

    def __getitem__(self, name: str) -> int:
        return self._values.get(name, 0)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)

    def reset(self) -> None:
        with self._lock:
            self._values = dict.fromkeys(STANDARD, 0)
