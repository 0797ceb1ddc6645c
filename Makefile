# Set-up is a side effect of the two commands users need: `make demo` and `make test`.
# Both are idempotent: the second call skips every install step.
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup browser lint demo test bench clean-workspace

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@command -v ffmpeg >/dev/null && command -v ffprobe >/dev/null || \
		{ echo "installing Debian's ffmpeg"; $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq ffmpeg >/dev/null; }
	@[ -x $(VENV)/bin/python ] || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -c constraints.txt -e '.[dev,dask]'
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/multianimate demo

# headless Chromium and its driver for the UI test (tests/flows/test_deployments.py); not needed by the demo
browser:
	@[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] || \
		{ echo "installing Debian's chromium and chromium-driver"; $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium chromium-driver >/dev/null; }

# ruff's lint rules and its formatter, mypy on data_schemas (pyproject.toml: [tool.ruff], [tool.mypy]);
# CI runs them through `make test`
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: setup browser lint
	$(VENV)/bin/python -m pytest -ra --durations=30

bench: setup
	$(VENV)/bin/python bench/ingest.py

clean-workspace:
	rm -rf workspace
