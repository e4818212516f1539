"""Benchmarks (not tests): vmd-py's vionet against QEMU's built-in virtio-net."""
