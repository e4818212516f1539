from __future__ import annotations

from vionet.counters import Counters
from vionet.vnethdr import DropReason


def test_counters_start_at_zero_and_count() -> None:
    c = Counters()
    assert c.snapshot() == {"rx_packets": 0, "rx_bytes": 0, "tx_packets": 0, "tx_bytes": 0}
    c.inc("rx_packets")
    c.add("rx_bytes", 1500)
    c.drop(DropReason.BAD_GSO_SIZE, "tx_")
    c.drop("runt")
    snap = c.snapshot()
    assert snap["rx_packets"] == 1 and snap["rx_bytes"] == 1500
    assert snap["tx_drop_bad_gso_size"] == 1 and snap["drop_runt"] == 1
    assert c["missing"] == 0 and c.get("rx_bytes") == 1500
    snap["rx_packets"] = 99  # a copy
    assert c["rx_packets"] == 1


def test_counters_wrap_at_u64() -> None:
    c = Counters()
    c.add("tx_bytes", (1 << 64) - 1)
    c.add("tx_bytes", 2)
    assert c["tx_bytes"] == 1
    c.reset()
    assert c["tx_bytes"] == 0
