# SPDX-License-Identifier: GPL-2.0-only
# xfrm-fastpath: the two commands that matter are `make demo` and `make test` (both set up first).
PY      := .venv/bin/python
PYTEST  := .venv/bin/pytest
RUFF    := .venv/bin/ruff
STAMP   := .venv/.setup-done

.PHONY: setup test test-host test-vm demo lint bench bench-e2e fuzz clean

$(STAMP): scripts/setup.sh scripts/fetch-kernel.sh pyproject.toml vm/kernel.env \
		scripts/build-kmod.sh kmod/xfp_crypto.c kmod/Kbuild bpf/include/kcrypto_defs.h
	bash scripts/setup.sh
	touch $@

setup:
	bash scripts/setup.sh
	touch $(STAMP)

## make test: everything CI runs: lint, host tests, then the VM-marked tests in two VM boots
## side by side (testbed/vmshards.py).
test: $(STAMP) lint
	$(PY) -m testbed.vmrun test

test-host: $(STAMP)
	$(PYTEST) -m "not vm and not bench" tests

test-vm: $(STAMP)
	$(PY) -m testbed.vmrun vm-only

## make demo: the test bed with strongSwan tunnels and ESP traffic (in the VM without host ESP).
demo: $(STAMP)
	$(PY) -m testbed.vmrun demo

lint: $(STAMP)
	$(RUFF) check controller testbed tests bench
	$(RUFF) format --check controller testbed tests bench
	clang-format --dry-run --Werror bpf/*.c bpf/tests/*.c bpf/include/*.h bpf/include/*/*.h 2>/dev/null || \
		{ [ -z "$$(ls bpf/*.c bpf/tests/*.c bpf/include/*.h bpf/include/*/*.h 2>/dev/null)" ] || clang-format --dry-run --Werror bpf/*.c bpf/tests/*.c bpf/include/*.h bpf/include/*/*.h; }

bench: $(STAMP)
	$(PYTEST) -m bench -s tests

## make bench-e2e: the fastpath gateway pair vs the kernel forwarding in clear, 1 and 2 CPUs,
## lookup cost by flow count, learning and invalidation (issue 8); then, beside it, the kernel's
## ESP vs the fastpath in instructions per packet (bench/e2e.py --esp, in the real-kernel VM under
## qemu -icount where this kernel has no ESP; BENCH_E2E_ARGS=--no-vm skips it). Results, JSON,
## summary.json and PNG plots in bench/results/ (matplotlib, the `bench` extra, installed here
## when missing).
BENCH_E2E_ARGS ?=
bench-e2e: $(STAMP)
	$(PY) -c 'import matplotlib' 2>/dev/null || .venv/bin/pip install -q --disable-pip-version-check -e '.[bench]'
	$(PY) bench/e2e.py $(BENCH_E2E_ARGS)

## make fuzz: the long datapath fuzzing campaign (docs/results.md): XFP_FUZZ_FRAMES frames
## through each XDP program, every one checked; figures printed at the end of each test.
XFP_FUZZ_FRAMES ?= 1000000
fuzz: $(STAMP)
	XFP_FUZZ_FRAMES=$(XFP_FUZZ_FRAMES) nice -n 10 $(PYTEST) -q -s -k "fuzz_encap or fuzz_decap" \
		tests/bpf/test_fuzz_datapath.py

clean:
	rm -rf .venv .pytest_cache build *.egg-info
