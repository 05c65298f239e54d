# The two commands of the README; both install what they need first.
PYTHON := .venv/bin/python

.PHONY: install demo test bench

install:
	.ci/install

demo: install
	$(PYTHON) examples/demo.py

test: install
	.venv/bin/ruff check .
	$(PYTHON) -m pytest -p no:logging -q

# Benchmarks against plain Salt (not tests): make bench ARGS="--nodes 30"
bench: install
	.venv/bin/pip install --quiet -r bench/requirements.txt
	$(PYTHON) bench/run $(ARGS)
