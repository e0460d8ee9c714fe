# Torch first, so that ray and friends never pull another torch build.
PY ?= python

.PHONY: setup test bench
setup:
	$(PY) -m pip install -q torch torchvision
	$(PY) -m pip install -q -e ".[test]"

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/bench_data.py
	$(PY) bench/bench_method.py
