# Ctrlable Provisioner: the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

.PHONY: help venv test lint test-companion test-ha test-e2e demo bench clean

help:
	@echo "make demo   run the product on its embedded defaults (simulator + companion + Home Assistant)"
	@echo "make test   install what is needed and run the whole suite (lint + tests)"
	@echo "make bench  run the benchmarks"

venv:
	@bash scripts/bootstrap.sh

lint: venv
	@bash scripts/lint.sh

test: venv
	@bash scripts/lint.sh
	@bash scripts/run-tests.sh

test-companion: venv
	@bash scripts/run-tests.sh companion

test-ha: venv
	@bash scripts/run-tests.sh ha

test-e2e: venv
	@bash scripts/run-tests.sh e2e

demo: venv
	@.venv/bin/ctrlable-companion demo

bench: venv
	@for b in bench/bench_*.py; do echo "== $$b"; .venv311/bin/python "$$b" || exit 1; done

clean:
	rm -rf .venv .venv311 .demo .pytest_cache .mypy_cache .ruff_cache
