#!/bin/sh
# Build (or reuse) the default guest; prints the kernel and initrd paths.
# Usage: scripts/build-guest.sh [--cache DIR] [--force]
set -e
cd "$(dirname "$0")/.."
exec .venv/bin/python -m vmd_py.guest_image "$@"
