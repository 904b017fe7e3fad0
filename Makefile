# The two entry points the README opens with. Both work on a fresh machine with Python 3.11:
#   make run    create .venv, install from requirements.lock, run the whole pipeline (dvc repro)
#   make test   the same setup, then the test suite (unit tests and real-data integration tests)
#   make test-fast   the edit loop: the tests that need no real data, no containers and nothing heavy, on both cores
#   make mutation    mutmut on the guard modules, then the score per module (tools/mutation_score.py)
#   make mutation-fast   the same on the guard modules with fast tests (CI)
#   make lint   ruff check, ruff format --check and mypy, all with zero findings
#   make stack-test   build the images and test docker/compose.yaml as containers (Docker, or podman)
#   make docs   the documentation site (mkdocs.yml, docs/) into site/, warnings as errors
PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed-stamp
# DVC runs each stage's `cmd` through the shell: the venv's console scripts must be on PATH.
export PATH := $(BIN):$(PATH)

.PHONY: setup run test test-fast mutation mutation-fast lint docs stack-test bench lock clean

# .dvc/config's plots.html_template: plain `dvc plots show` uses this page, with vega, vega-lite and vega-embed
# inlined from the npm registry, so it renders offline (DVC's own page loads them from a CDN). Not committed:
# it is some 800 kB of other projects' minified JavaScript, built once here with npm.
PLOTS_TEMPLATE := .dvc/plots/offline.html

setup: $(STAMP) $(PLOTS_TEMPLATE)

$(STAMP): pyproject.toml requirements.lock build-tools.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --timeout 120 --retries 10 -r build-tools.txt
	$(BIN)/pip install --quiet --timeout 120 --retries 10 --resume-retries 20 -c requirements.lock -e '.[pipeline,dev]'
	touch $@

run: setup
	dvc repro

# Every test, spread over the cores by pytest-xdist: one at a time, the suite kept one of 2 cores busy (1,916 s of
# CPU in 1,983 s for the real-data tests alone). --dist loadfile gives each worker whole modules, so a module's
# fixture (a trained project, a Prefect deployment) is still built once. JOBS=N sets the workers.
test: setup
	pytest -n $(or $(JOBS),auto) --dist loadfile $(PYTEST_ARGS)

# The tests that need neither the genuine data nor containers (generated IDX files, real servers on 127.0.0.1),
# and are not `heavy` (10 s or more of their own: make test runs them), spread over the cores by pytest-xdist: the
# set mutmut runs from. Its fuzz tests run hypothesis' "fast" profile, 100 examples each instead of make test's 400
# (tests/conftest.py). Time on an Intel Xeon with 2 CPUs: docs/development.md.
test-fast: setup
	pytest -m "not realdata and not heavy" -n $(or $(JOBS),auto) --hypothesis-profile=fast $(PYTEST_ARGS)

# mutmut plants one-line bugs in the guard modules ([tool.mutmut] in pyproject.toml) and runs the fast tests
# that reach each one; mutants/ keeps its results, so a second run retests only what changed. The score per
# module, with the survivors judged equivalent (tests/mutation/equivalent.txt) set aside, goes to
# mutants/score.json; it fails when a module falls below its floor (tests/mutation/floor.json).
# mutmut forks each mutant's process from one that has already run torch: with OpenMP's worker threads there,
# a child that runs torch again waits for threads that do not exist (mutants of calibrate hung until their
# time limit). One OpenMP thread starts none.
MUTMUT = OMP_NUM_THREADS=1 mutmut run --max-children $(or $(JOBS),$(shell nproc))
mutation: setup
	@mkdir -p mutants
	$(MUTMUT) > mutants/run.log 2>&1 || { tail -n 40 mutants/run.log; exit 1; }
	python tools/mutation_score.py

# What CI runs, inside its 90 minutes beside the tests and the stack: the guards that protect data and users
# first (ingest's checks, the inputs and predict's refusals), some 14.5 minutes in a fresh clone's CI run.
# Left to make mutation: protocols (595 mutants, each rerunning the hypothesis fuzz of every parser: with them,
# and the stack's images built from nothing, CI's parts came to some 95 minutes), registry (its 168 mutants
# took some 15 minutes more: each reruns tests on MLflow stores), drift, config and calibrate (config's loader
# alone is reached by some 60 tests), and export, inference and server, whose mutants rerun tests that export
# ONNX models or start servers.
MUTATION_FAST := serving.inputs stages.data serving.predict
mutation-fast: setup
	@mkdir -p mutants
	$(MUTMUT) $(foreach m,$(MUTATION_FAST),"softmax_mlops.$(m).*") \
		> mutants/run.log 2>&1 || { tail -n 40 mutants/run.log; exit 1; }
	python tools/mutation_score.py $(MUTATION_FAST)

# ruff (lint and format, rules in pyproject.toml) and mypy on src/ and pipelines/: zero findings, or it fails.
lint: setup
	ruff check .
	ruff format --check .
	mypy

# mkdocs with the material theme and mkdocstrings (the API reference from the docstrings), offline; --strict makes
# every warning, a broken link or anchor among them (validation: in mkdocs.yml), an error. mkdocs-material prints a
# banner about MkDocs 2.0 on every build; it is no warning, and NO_MKDOCS_2_WARNING silences it.
docs: setup
	NO_MKDOCS_2_WARNING=1 mkdocs build --strict --site-dir site

stack-test: setup
	python docker/stack_test.py

$(PLOTS_TEMPLATE): tools/offline_plots.py | $(STAMP)
	$(BIN)/python tools/offline_plots.py $@

# Each benchmark prints its table and writes it to benchmarks/results/<script>.json (commit those: docs/benchmarks.md
# shows them). One at a time, since they share the cores. Set FASHION_MNIST_MIRROR as for `dvc repro`;
# inference_speed and vs_mlflow need `dvc repro` first. sweep_concurrency alone takes some 13 minutes.
bench: setup
	python benchmarks/train_speed.py
	python benchmarks/pipeline_time.py
	python benchmarks/prefect_overhead.py
	python benchmarks/inference_speed.py
	python benchmarks/batch_scale.py
	python benchmarks/vs_mlflow.py
	python benchmarks/metrics_overhead.py
	python benchmarks/sweep_concurrency.py

# Refresh the lock from the current venv after changing dependencies in pyproject.toml.
lock: setup
	{ sed -n '1,3p' requirements.lock; pip freeze --exclude-editable | sort -f; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean:
	rm -rf data/prepared/*.npz models metrics reports mlflow.db mlartifacts
