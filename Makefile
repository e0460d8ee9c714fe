# Torch first, so that ray and friends never pull another torch build.
PY ?= python

.PHONY: setup lint test test-fast bench
setup:
	$(PY) -m pip install -q torch torchvision
	$(PY) -m pip install -q -e ".[test]"

lint:
	$(PY) -m ruff check .

test: setup  # lint first (as a recipe line, so that even `make -j` installs ruff before using it)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

test-fast:
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) bench/bench_data.py
	$(PY) bench/bench_method.py
