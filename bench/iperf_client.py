"""The host-side iperf3 client against a guest's ``iperf3 -s``, shared by bench/ and tests/.

The guest's server takes one test at a time and resets between tests. A client that arrives
during that reset is refused, reset, told the server is busy, or has its control socket closed;
in every case before the test's first interval, so before any data moved. Such an attempt is
the tool's, not the device's: it is retried. An error after data moved is the transfer's own
and is raised with the intervals it reached, so a device fault is never retried away.
"""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

ATTEMPTS = 20
RETRY_S = 0.5


class IperfError(AssertionError):
    pass


def run_iperf3(server: str, seconds: int, reverse: bool = False,
               extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """One iperf3 test against server (reverse: the server sends); its parsed -J result."""
    argv = ["iperf3", "-c", server, "-t", str(seconds), "-J", *extra]
    if reverse:
        argv.append("-R")
    errors: list[str] = []
    for _attempt in range(ATTEMPTS):
        res = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
        try:
            data: dict[str, Any] = json.loads(res.stdout)
        except json.JSONDecodeError as exc:
            raise IperfError(f"iperf3 {' '.join(argv[1:])}: no JSON ({exc}): "
                             f"{res.stdout[-400:]!r} {res.stderr[-400:]!r}") from None
        error = data.get("error")
        if not error:
            return data
        intervals = len(data.get("intervals", []))
        if intervals:
            raise IperfError(f"iperf3 {' '.join(argv[1:])}: {error} after {intervals} "
                             f"interval(s) of data")
        errors.append(error)
        time.sleep(RETRY_S)
    raise IperfError(f"iperf3: server {server} never took a test in {ATTEMPTS} attempts: "
                     f"{sorted(set(errors))}")
