# Set-up is a side effect of the two commands users need: `make demo` and `make test`.
# Both are idempotent: the second call skips every install step.
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test bench clean-workspace

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

test: setup
	$(VENV)/bin/python -m pytest -ra

bench: setup
	$(VENV)/bin/python bench/ingest.py

clean-workspace:
	rm -rf workspace
