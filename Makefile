# SPDX-License-Identifier: GPL-2.0-only
# xfrm-fastpath: the two commands that matter are `make demo` and `make test` (both set up first).
PY      := .venv/bin/python
PYTEST  := .venv/bin/pytest
RUFF    := .venv/bin/ruff
STAMP   := .venv/.setup-done

.PHONY: setup test test-host test-vm demo lint bench clean

$(STAMP): scripts/setup.sh scripts/fetch-kernel.sh pyproject.toml vm/kernel.env
	bash scripts/setup.sh
	touch $@

setup:
	bash scripts/setup.sh
	touch $(STAMP)

## make test: everything CI runs: lint, host tests, then the VM-marked tests in one VM boot.
test: $(STAMP) lint
	$(PY) -m controller.vmrun test

test-host: $(STAMP)
	$(PYTEST) -m "not vm and not bench" tests

test-vm: $(STAMP)
	$(PY) -m controller.vmrun vm-only

## make demo: the test bed with strongSwan tunnels and ESP traffic (in the VM without host ESP).
demo: $(STAMP)
	$(PY) -m controller.vmrun demo

lint: $(STAMP)
	$(RUFF) check controller tests
	$(RUFF) format --check controller tests
	clang-format --dry-run --Werror bpf/*.c bpf/include/*.h 2>/dev/null || \
		{ [ -z "$$(ls bpf/*.c bpf/include/*.h 2>/dev/null)" ] || clang-format --dry-run --Werror bpf/*.c bpf/include/*.h; }

bench: $(STAMP)
	$(PYTEST) -m bench -s tests

clean:
	rm -rf .venv .pytest_cache build *.egg-info
