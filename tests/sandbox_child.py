"""A sandboxed child for tests/test_sandbox.py: sandbox itself, probe, report, wait.

Started as root with the tap fd inherited. Prints one JSON line of probe results, then waits for
a line on stdin so the test can inspect /proc/<pid> while the sandbox is in force.
"""

from __future__ import annotations

import argparse
import json
import sys

import trio

from vionet.probe import run_probes
from vmd_py import sandbox


async def _sandboxed_main(tap_fd: int | None, lock: bool) -> dict[str, str]:
    if lock:
        # After trio made its epoll fd and wakeup socketpair, as a real worker does.
        sandbox.lock_down()
    results = run_probes(tap_fd)

    def in_thread() -> str:
        return "ok"

    try:
        results["trio_thread"] = await trio.to_thread.run_sync(in_thread)
    except (OSError, RuntimeError) as e:
        results["trio_thread"] = repr(e)
    await trio.sleep(0.01)
    results["trio_sleep"] = "ok"
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tap-fd", type=int)
    ap.add_argument("--empty-root", required=True)
    ap.add_argument(
        "--mode", choices=("split", "enter", "control"), default="split",
        help="split: drop privileges, lock down inside trio.run; enter: everything before "
        "trio.run; control: no sandbox at all",
    )
    args = ap.parse_args()
    if args.mode == "split":
        sandbox.drop_privileges(empty_root=args.empty_root)
    elif args.mode == "enter":
        sandbox.enter(empty_root=args.empty_root)
    results = trio.run(_sandboxed_main, args.tap_fd, args.mode == "split")
    sys.stdout.write(json.dumps(results) + "\n")
    sys.stdout.flush()
    sys.stdin.readline()


if __name__ == "__main__":
    main()
