# edgefleet: the two commands a new user needs are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
TFLITE_VENV := .venv-tflite
PY := $(VENV)/bin/python
PIP_FLAGS := --disable-pip-version-check --quiet

.PHONY: install install-tflite test test-main test-slow test-tflite test-arm64 demo bench lint clean broker fuzz test-packaging

install: $(VENV)/.installed

# Re-run only when the dependency list changes: a second `make install` is instant.
$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install $(PIP_FLAGS) --upgrade pip
	@echo "installing edgefleet[all] into $(VENV) ..."
	@$(PY) -m pip install $(PIP_FLAGS) -e '.[all]'
	@touch $@

# The legacy runtime for 32-bit Pi OS and Coral stacks: tflite-runtime needs numpy<2.
install-tflite: $(TFLITE_VENV)/.installed

$(TFLITE_VENV)/.installed: pyproject.toml
	@test -x $(TFLITE_VENV)/bin/python || $(PYTHON) -m venv $(TFLITE_VENV)
	@echo "installing edgefleet[tflite-runtime] into $(TFLITE_VENV) ..."
	@$(TFLITE_VENV)/bin/pip install $(PIP_FLAGS) -e '.[tflite-runtime]' pytest pytest-timeout 'hypothesis>=6.100'
	@touch $@

broker:
	@scripts/ensure_package.sh mosquitto mosquitto
	@scripts/ensure_package.sh nats-server nats-server
	@scripts/ensure_package.sh '/usr/lib/postgresql/*/bin/initdb' postgresql
	@scripts/ensure_package.sh prometheus prometheus

test: install install-tflite broker
	@$(MAKE) --no-print-directory test-main
	@$(MAKE) --no-print-directory test-tflite

# Everything but the suites marked slow (a MobileNetV2 trained and converted, the mini-Xception
# speed search): those run in `make test-slow`, which CI runs too.
# Two workers, a test file each (module fixtures stay in one process; servers take free ports):
# the suite waits on brokers and agents more than it computes. TEST_JOBS=0 runs it in one process.
TEST_JOBS ?= 2

test-main:
	$(PY) -m pytest -m "not slow" -n $(TEST_JOBS) --dist loadfile --durations=15 tests

test-slow: install broker
	$(PY) -m pytest -m slow tests -p no:cacheprovider

# The runtime tests once more under tflite-runtime + numpy 1.x (no TensorFlow in that venv).
test-tflite:
	$(TFLITE_VENV)/bin/python -m pytest -m runtime tests/agent -p no:cacheprovider

# The agent on emulated 64-bit Raspberry Pi OS (Debian bookworm arm64, qemu-user-static): the wheel
# installed in a cached root, `-m runtime tests/agent`, a real edge-agent run and validate of
# artifacts converted here (docs/arm64.md). Root preparation ~5 min once; exit 3: cannot prepare.
test-arm64: install
	@PY=$(PY) scripts/test_arm64.sh

# The wheel, and the agent and fleet extras each installed alone into a fresh venv from the
# registry, their programs run there (about 2 min; `make test` checks only the wheel's contents).
test-packaging: install
	EDGEFLEET_PACKAGING=1 $(PY) -m pytest tests/packaging -p no:cacheprovider

# The parsers' fuzz tests with many more examples than `make test` gives them (about 10 min).
fuzz: install
	HYPOTHESIS_PROFILE=deep $(PY) -m pytest -m fuzz tests -p no:cacheprovider

demo: install broker
	$(PY) scripts/demo.py

bench: install broker
	$(PY) scripts/bench_all.py

lint: install
	$(VENV)/bin/ruff check edgefleet agent converter fleet scripts tests

clean:
	rm -rf $(VENV) $(TFLITE_VENV) build *.egg-info .pytest_cache
