# vmd-py: every target does its own set-up (apt packages, venv, guest image) first.
PY      ?= /usr/bin/python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: all setup host venv guest test lint demo bench fuzz soak clean

all: test

host:
	bash scripts/setup-host.sh

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: host $(STAMP)

setup: venv

# The default guest (Debian kernel, busybox, iperf3); cached, rebuilt only when inputs change.
guest: venv
	$(VPY) -m vmd_py.guest_image

demo: guest
	$(VPY) scripts/demo.py

# vmd-py's vionet against QEMU's own virtio-net on a tap, same guest, A/B rounds (BENCH_ARGS).
bench: guest
	$(VPY) -m bench.netbench $(BENCH_ARGS)

# Every fuzzer for FUZZ_RUNS inputs (libFuzzer via atheris); prints inputs and crashes each.
FUZZ_RUNS ?= 1000000
fuzz: venv
	$(VPY) fuzz/run_all.py --runs $(FUZZ_RUNS) --jobs 2

# Long checks, not in `make test`: 100 worker kills (parent fd/RSS), then 10 min of iperf3 both
# ways plus a second VM's start/stop loop, sampling every vmd process (SOAK_ARGS=--minutes 3).
soak: guest
	VMD_KILL_CYCLES=100 $(VPY) -m pytest -p no:cacheprovider -s tests/test_e2e_recovery.py -k worker_kills
	$(VPY) -m bench.soak $(SOAK_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy fuzz/*.py

test: guest
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy fuzz/*.py
	$(VPY) -m pytest

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
