"""``vmd``: the daemon's command line entry point (the privileged code lives in parent/)."""

from __future__ import annotations


def main() -> int:
    from parent.daemon import main as daemon_main

    return daemon_main()


if __name__ == "__main__":
    raise SystemExit(main())
