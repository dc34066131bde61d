VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup setup-test demo test test-fast bench clean

setup:
	@scripts/bootstrap

setup-test:
	@scripts/bootstrap test

demo: setup
	$(VENV)/bin/oncotwin demo

test: setup-test
	$(PY) -m pytest

test-fast: setup-test
	$(PY) -m pytest -m "not slow and not integration"

bench: setup-test
	$(PY) -m bench.forward

clean:
	rm -rf $(VENV) .pytest_cache demo-out
