# make help lists the targets. ARGS passes Hydra overrides: make run ARGS="scheduler=step optimizer.lr=0.1"
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
STORE ?= $(if $(MLFLOW_TRACKING_URI),$(MLFLOW_TRACKING_URI),sqlite:///$(CURDIR)/mlflow.db)

.PHONY: help install run sweep schedules study-bn lr-find report test test-slow test-gpu bench \
	bench-study bench-fused ui ui-check server server-stop lint clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

# The environment is made once, and again only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,distributed]"
	touch $@

install: $(VENV)/.installed  ## create .venv and install sweep (editable) with dev extras

run: install  ## train once: make run ARGS="scheduler=cosine"
	$(PY) -m sweep $(ARGS)

sweep: install  ## Optuna search over schedules: make sweep ARGS="study.trials=20"
	$(PY) -m sweep.study $(ARGS)

schedules: install  ## plot schedules without training: make schedules ARGS="+schedules=all"
	$(PY) -m sweep.schedules $(ARGS)

study-bn: install  ## the BN-versus-no-BN lr sensitivity study: make study-bn ARGS="sensitivity.seeds=[929,1]"
	$(PY) -m sweep.sensitivity experiment=bn_sensitivity $(ARGS)

lr-find: install  ## LR range test: make lr-find ARGS="model=mlp dataset=synthetic_regression"
	$(PY) -m sweep.lr_find $(ARGS)

report: install  ## a study's schedule comparison, read back from MLflow: make report ARGS="report.study=schedules"
	$(PY) -m sweep.report $(ARGS)

test: install  ## the default test suite (fast; what CI runs)
	$(PY) -m pytest

test-slow: install  ## the longer tests
	$(PY) -m pytest -m slow

test-gpu: install  ## CUDA tests (skip without a GPU)
	$(PY) -m pytest -m gpu

bench: install  ## trainer overhead against a hand-written loop
	$(PY) scripts/bench_trainer.py

bench-study: install  ## the study's own cost per trial against training time
	$(PY) scripts/bench_study.py

bench-fused: install  ## fused trials against one at a time: MLPs, CNNs; ARGS="--study-bn" for make study-bn
	$(PY) scripts/bench_fused.py --repeats 5 --engines $(ARGS)

ui: install  ## open the MLflow UI on the store runs log to (in "Model training" mode)
	@echo "open http://127.0.0.1:5000 and switch the toggle at the top left to 'Model training'"
	$(VENV)/bin/mlflow ui --backend-store-uri $(STORE)

ui-check: install  ## a tiny study checked in headless Chromium; screenshots in ui-check/
	$(PY) scripts/ui_check.py --out ui-check

server: install  ## local PostgreSQL + MLflow server for many workers (.server/; prints the URLs)
	VENV=$(VENV) scripts/server.sh start

server-stop:  ## stop what make server started
	scripts/server.sh stop

lint: install  ## ruff
	$(VENV)/bin/ruff check src tests scripts

clean:  ## remove outputs, the local MLflow store and caches (keeps .venv)
	rm -rf outputs multirun mlflow.db mlartifacts ui-check .pytest_cache .ruff_cache
