# Two commands a newcomer needs: `make demo` (train the default model on the embedded world and show
# what it generates) and `make test` (the suite). Both create or refresh .venv first.
PY := .venv/bin/python
PIP := $(PY) -m pip
TORCH_CPU := torch==2.13.0

.PHONY: venv demo test lint format clean

venv: .venv/.installed

.venv/.installed: pyproject.toml
	# --system-site-packages: a torch already installed for this python (a GPU build) stays in use.
	test -x $(PY) || python3 -m venv --system-site-packages .venv
	# Install the CPU build of torch only where no torch is importable: a GPU user's torch is kept.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_CPU)
	$(PIP) install -q -e ".[dev]"
	touch $@

demo: venv
	$(PY) scripts/demo.py $(ARGS)

test: venv
	$(PY) -m pytest tests

lint: venv
	$(PY) -m ruff check . && $(PY) -m ruff format --check . && .venv/bin/lint-imports

format: venv
	$(PY) -m ruff check --fix . && $(PY) -m ruff format .

clean:
	rm -rf outputs multirun .pytest_cache
