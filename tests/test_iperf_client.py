"""The iperf3 client's retry policy: the server's between-tests reset is retried, a fault in
the middle of a transfer is not."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from bench import iperf_client
from bench.iperf_client import IperfError, run_iperf3


def fake_runs(monkeypatch: pytest.MonkeyPatch, outputs: list[dict[str, Any]]) -> list[list[str]]:
    calls: list[list[str]] = []

    def run(argv: list[str], **_kw: Any) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 1, json.dumps(outputs[len(calls) - 1]), "")

    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setattr(iperf_client, "RETRY_S", 0)
    return calls


DONE = {"intervals": [{}, {}], "end": {"sum_received": {"bits_per_second": 1e9}}}


def test_errors_before_any_data_are_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_runs(monkeypatch, [
        {"error": "unable to connect to server: Connection refused"},
        {"error": "control socket has closed unexpectedly", "intervals": []},
        {"error": "the server is busy running a test. try again later"},
        DONE,
    ])
    assert run_iperf3("10.0.0.2", 3, reverse=True) == DONE
    assert len(calls) == 4
    assert calls[0][-1] == "-R"


def test_error_after_data_moved_is_raised_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_runs(monkeypatch, [
        {"error": "control socket has closed unexpectedly", "intervals": [{}, {}, {}]},
        DONE,
    ])
    with pytest.raises(IperfError, match=r"closed unexpectedly after 3 interval"):
        run_iperf3("10.0.0.2", 3)
    assert len(calls) == 1


def test_a_server_that_never_takes_a_test_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_runs(monkeypatch, [{"error": "Connection refused"}] * iperf_client.ATTEMPTS)
    with pytest.raises(IperfError, match="never took a test"):
        run_iperf3("10.0.0.2", 3)
