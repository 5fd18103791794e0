# blip2-workbook — `make help` lists the targets. A fresh machine needs exactly `make demo` and `make test`.
SHELL := /bin/bash
PY := .venv/bin/python
STAMP := .venv.stamp
PYTEST_ARGS ?=
# `make test` runs pytest-xdist workers (auto: one per core), each with its share of the threads (tests/conftest.py);
# worksteal: an idle worker takes queued tests from a busy one, so a few minute-long tests do not decide the wall time.
PYTEST_WORKERS ?= auto
XDIST := -n $(PYTEST_WORKERS) --dist worksteal

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@echo "==> creating .venv and installing blip2lib[all] (editable; torch from the local wheels)"
	@test -x $(PY) || python3 -m venv .venv
	@$(PY) -m pip install -q --upgrade pip >/dev/null 2>&1 || true
	@$(PY) -m pip install -q -e '.[all]'
	@touch $(STAMP)
	@echo "==> environment ready: $(PY)"

venv: $(STAMP) ## create .venv and install -e .[all] (only if missing or pyproject.toml changed)

test: $(STAMP) ## run every CPU test tier (unit, dist, notebooks smoke, browser, repo; gpu tests are skipped)
	@echo "==> running tests (all CPU tiers, $(PYTEST_WORKERS) workers; gpu-marked tests are skipped without CUDA)"
	$(PY) -m pytest $(XDIST) --durations=25 $(PYTEST_ARGS)

test-fast: $(STAMP) ## unit tests only (no slow/dist/notebook tiers)
	$(PY) -m pytest $(XDIST) -m "not slow and not dist and not notebook and not browser and not gpu" $(PYTEST_ARGS)

test-world: $(STAMP) ## build the full toy world from scratch and assert its bars (what `make demo` measures; ~4 min)
	$(PY) -m pytest -m world $(PYTEST_ARGS)

gpu-check: $(STAMP) ## on a GPU host: the gpu-marked tests
	$(PY) -m pytest -m gpu -o addopts="--strict-markers -ra" $(PYTEST_ARGS)

lint: $(STAMP) ## ruff check + format check
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

format: $(STAMP) ## ruff format + autofix; strip notebook outputs (cell ids kept)
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .
	.venv/bin/nbstripout --keep-id notebooks/*.ipynb

demo: $(STAMP) ## run the main job end to end on the embedded toy world
	$(PY) -m blip2lib.demo $(if $(FORCE),--force)

clean: ## remove caches, runs and build artefacts (keeps .venv)
	rm -rf runs .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

MODULES ?=
ONLY ?=
mutate: $(STAMP) ## mutation testing (mutmut) of the science modules; MODULES="losses qformer" ONLY='glob' (docs/mutation.md)
	@$(PY) -c "import mutmut" 2>/dev/null || $(PY) -m pip install -q -e '.[mutation]'
	$(PY) tools/mutate.py --modules "$(MODULES)" --only "$(ONLY)"

.PHONY: help venv test test-fast test-world gpu-check lint format demo clean mutate
