"""``python -m vmd_py.sandbox_exec USER -- ARGV...``: run ARGV unprivileged in empty namespaces.

The parent starts QEMU through this so that the drop happens in a fresh single-threaded
process after fork+exec (never in a preexec hook of the threaded daemon).
"""

from __future__ import annotations

import sys

from vmd_py.sandbox import SandboxError, exec_unprivileged


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 3 or args[1] != "--":
        print("usage: python -m vmd_py.sandbox_exec USER -- PROGRAM [ARG...]", file=sys.stderr)
        return 2
    try:
        exec_unprivileged(args[2:], args[0])
    except (SandboxError, OSError) as exc:
        print(f"sandbox_exec: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
