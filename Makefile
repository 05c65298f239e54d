# The two commands of the README; both install what they need first.
PYTHON := .venv/bin/python

.PHONY: install demo test

install:
	.ci/install

demo: install
	$(PYTHON) examples/demo.py

test: install
	$(PYTHON) -m pytest -p no:logging -q
