# The two commands of the README, and the ones around them.
#   make serve   create .venv, install the serving dependencies only, serve the shipped model on :8000
#   make test    create .venv, install everything the tests need, run lint, types and the whole suite
#   make test-fast  the tests not marked slow (no server processes, no container builds): the quick loop
# Every target creates .venv with `$(PYTHON) -m venv` when it is missing.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Extras the test suite needs; `ray` is the optional distributed scorer (tests skip it when absent);
# `pacs` the DICOMweb input (tests run it against a real Orthanc, installed by .ci/run).
TEST_EXTRAS ?= train,plots,dev,ray,adapt,pacs
PIP := $(BIN)/python -m pip

# `make train DATA=...`, `make evaluate DATA=...`: a Kaggle-layout folder (train/ and test/ inside).
DATA ?= ../shared/data/chest_xray
# What DATA is, for the model card and the test-look ledger (datasets/README.md).
DATASET ?= datasets/kermany-2018.json
# The model's own version in its card: a release sets it (docs/model.md), e.g. make ship MODEL_VERSION=3.0.0;
# unset, pneumonia export's default.
MODEL_VERSION ?=
RUN ?= runs/cnn
MODEL ?= $(RUN)/model.onnx
EVAL ?= $(RUN)/eval

.PHONY: serve test test-fast lint ruff mypy venv install-serve install-test install-ship lock train export evaluate ship cards bench guard-bench site frontal-fit load \
	container container-original clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

venv: $(BIN)/python

install-serve: $(BIN)/python
	$(PIP) install .

# Installed once per change of pyproject.toml or TEST_EXTRAS (a stamp in the venv), so that
# `make lint` and the pre-commit hooks are quick after the first run.
comma := ,
TEST_STAMP := $(VENV)/.installed-$(subst $(comma),-,$(TEST_EXTRAS))

$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(PIP) install -e '.[$(TEST_EXTRAS)]'
	touch $@

install-test: $(TEST_STAMP)

serve: install-serve
	$(BIN)/pneumonia serve

# ruff and mypy come with the test install (the dev extra; mypy also needs the packages it
# checks against, torch included): on a fresh clone `make lint` installs them first.
# .pre-commit-config.yaml runs these two targets.
lint: ruff mypy

ruff: install-test
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/ruff check src tests benchmarks

mypy: install-test
	$(BIN)/mypy

test: install-test lint
	$(BIN)/python -m pytest

# Everything not marked slow (pytest -m "not slow"): under a minute on an idle 2-core machine.
test-fast: install-test
	$(BIN)/python -m pytest -m "not slow" -q

train: install-test
	$(BIN)/pneumonia train --data $(DATA) --out $(RUN)

export: install-test
	$(BIN)/pneumonia guard fit $(RUN) --no-progress
	$(BIN)/pneumonia export $(RUN) --out $(MODEL)

evaluate: install-test
	$(BIN)/pneumonia evaluate --model $(MODEL) --data $(DATA) --json $(EVAL)/test.json \
		--markdown $(EVAL)/test.md --plots $(EVAL)/plots $(if $(wildcard $(RUN)/config.json),--run-dir $(RUN))

# Rebuild the shipped model and its baseline from the data (benchmarks/ship.py), in their own
# environment installed from the lock file (requirements/ship.lock, docs/training.md), timed
# step by step into $(SHIP_OUT)/ship.json. By default a scratch folder: artifacts/ is only read,
# to compare the rebuilt models with the published ones on the validation split, and the test
# set is not scored. `make ship PUBLISH=1 MODEL_VERSION=3.0.0` also exports into artifacts/,
# refits the shipped file's frontal-chest check (frontal-fit), scores the test set once per
# model (a look recorded in artifacts/test_looks.json), reruns the input-check benchmark and
# renders the cards.
SHIP_OUT ?= runs/ship-$(shell date -u +%Y%m%d-%H%M%S)
SHIP_VENV ?= .venv-ship
SHIP_LOCK ?= requirements/ship.lock
PUBLISH ?=

$(SHIP_VENV)/.installed: $(SHIP_LOCK) pyproject.toml
	$(PYTHON) -m venv $(SHIP_VENV)
	$(SHIP_VENV)/bin/python -m pip install -r $(SHIP_LOCK)
	$(SHIP_VENV)/bin/python -m pip install --no-deps -e .
	touch $@

install-ship: $(SHIP_VENV)/.installed

ship: install-ship
	$(SHIP_VENV)/bin/python benchmarks/ship.py --data $(DATA) --dataset $(DATASET) --out $(SHIP_OUT) \
		$(if $(MODEL_VERSION),--version $(MODEL_VERSION))$(if $(PUBLISH), --publish)

# The lock file itself: every package of the train and plots extras at one version, resolved
# by pip-tools (torch 2.13.0+cpu comes from a find-links folder or PyTorch's CPU index).
lock: install-test
	$(PIP) install pip-tools
	$(BIN)/pip-compile -q --extra train --extra plots --strip-extras --no-emit-find-links \
		--no-emit-index-url -o $(SHIP_LOCK) pyproject.toml

# The committed Markdown cards, rendered from the model files, their test reports and the
# test-look ledger (tests/test_card.py checks the committed ones are exactly this). Lean: no torch.
cards: install-test
	$(BIN)/pneumonia card --model artifacts/model.onnx --report artifacts/eval/test.json \
		--baseline artifacts/baseline/eval/test.json --previous artifacts/v2/eval/test.json \
		--previous-label "pneumonia-effnet_lite0 2.0.0 (v2, float32)" --ledger artifacts/test_looks.json \
		--out artifacts/model.card.md
	$(BIN)/pneumonia card --model artifacts/baseline/model.onnx --report artifacts/baseline/eval/test.json \
		--ledger artifacts/test_looks.json --out artifacts/baseline/model.card.md

# The input check's refusal rate per kind of non-radiograph (photos, pages, screenshots, ...)
# and its refusal and flag rates on the validation and test films (docs/input_check.md).
guard-bench: install-test
	$(BIN)/python benchmarks/bench_guard.py --model $(MODEL) --run $(RUN) --data $(DATA) \
		--nonxray runs/nonradiographs --json runs/bench_guard.json

# Fit the shipped model to the NIH site (../shared/data/nih_site) and measure it: the figures of
# docs/site.md (cross-validated figures, learning curve, halves of the patients, 100 films, the
# development non-radiographs). SITE=... for another labelled site folder.
SITE ?= ../shared/data/nih_site
site: install-test
	test -d runs/nonradiographs-dev || $(BIN)/python benchmarks/nonradiographs.py --set dev --out runs/nonradiographs-dev
	$(BIN)/python benchmarks/bench_site.py --model artifacts/model.onnx --data $(SITE) \
		--nonxray runs/nonradiographs-dev --json runs/bench_site.json --keep runs/site/site.onnx

# The frontal-chest check (docs/input_check.md#the-frontal-chest-check): embed the development
# sets with MODEL, cross-validate, leave each group out, and write the head into MODEL (its
# graph and weights untouched). Needs ../shared/data (chest_xray/train, nih_site, not_frontal_chest).
FRONTAL_FEATURES ?= runs/frontal-features
frontal-fit: install-test
	$(BIN)/python benchmarks/nonradiographs.py --set dev --out runs/nonradiographs-dev
	$(BIN)/python benchmarks/frontal_features.py --model $(MODEL) --data $(DATA) \
		--nih ../shared/data/nih_site --not-frontal ../shared/data/not_frontal_chest \
		--nonxray runs/nonradiographs-dev --out $(FRONTAL_FEATURES)
	$(BIN)/python benchmarks/frontal_fit.py --features $(FRONTAL_FEATURES) \
		--json runs/frontal_cv.json --write $(MODEL)
	$(BIN)/python benchmarks/bench_frontal.py --model $(MODEL) \
		--images ../shared/data/not_frontal_chest runs/nonradiographs-dev --json runs/bench_frontal.json

# Serving speed and memory against the re-created original TensorFlow stack (docs/benchmarks.md),
# then batch-scoring throughput and memory by engine. Run on an idle machine.
bench: install-test
	bash benchmarks/setup_original.sh
	$(BIN)/python benchmarks/bench_serve.py --runs 3 --json runs/bench_serve.json
	$(BIN)/python benchmarks/bench_score.py --images 10000

# Minutes of uploads on `pneumonia serve` (shipped model unless LOAD_ARGS says --model):
# errors, latency, the memory curve, a burst past capacity, recovery (docs/reliability.md).
# Run on an idle machine; e.g. make load LOAD_ARGS="--duration 600 --resize 1500x1200".
load: install-test
	$(BIN)/python benchmarks/load.py --json runs/load.json $(LOAD_ARGS)

# The serving image built from the Dockerfile and proven on the target box, 0.1 CPU and 256 MB,
# with podman (README "Container"): health, HEALTHCHECK, films, a batch, a heatmap, bad inputs,
# a minute of load, the cgroup's peak memory, a clean stop. Needs only python3. Skips, saying how
# to enable it, where podman cannot run; fails instead in CI (CI=true).
container:
	$(PYTHON) benchmarks/container_check.py --json runs/container.json $(CONTAINER_ARGS)

# The re-created original TensorFlow stack as an image, run on the same box (expect an OOM kill).
container-original:
	$(PYTHON) benchmarks/container_original.py --json runs/container_original.json

clean:
	rm -rf $(VENV) $(SHIP_VENV) build dist .pytest_cache .mypy_cache .ruff_cache
