# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# the dashboard's charting library, from the npm registry at set-up (served by the gateway)
UPLOT_VERSION := 1.6.32
DASH_STATIC := src/steadyserve/dashboard/static
UPLOT := $(DASH_STATIC)/uPlot.iife.min.js

.PHONY: install run test test-fast lint bench bench-cache bench-overload bench-balancers bench-autoscale bench-deps clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# pinned first: a CPU wheel from local disk (unpinned torch would pull a multi-GB CUDA build)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[model,dev,ray]'
	touch $(STAMP)

$(UPLOT):
	mkdir -p build/npm
	cd build/npm && npm pack --silent uplot@$(UPLOT_VERSION)
	tar -xzf build/npm/uplot-$(UPLOT_VERSION).tgz -C build/npm
	cp build/npm/package/dist/uPlot.iife.min.js build/npm/package/dist/uPlot.min.css $(DASH_STATIC)/
	cp build/npm/package/LICENSE $(DASH_STATIC)/uPlot.LICENSE

install: $(STAMP) $(UPLOT)

run: install  ## serve the default deployment (minilm, 2 replicas) on http://127.0.0.1:8000
	$(BIN)/steadyserve run

test: install  ## the whole suite: unit, component, integration (slow ones included)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install  ## unit + component only
	$(BIN)/python -m pytest tests/unit tests/component $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy src

bench-deps: install
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/python -m pip install -q fastapi

bench: bench-deps  ## benchmarks/README.md says what each prints
	$(BIN)/python benchmarks/serving.py

bench-cache: bench-deps  ## response cache, feature cache, affinity (benchmarks/README.md)
	$(BIN)/python benchmarks/cache.py

bench-overload: bench-deps  ## one class at 3x capacity: goodput, rejections, accepted latency, loop lag
	$(BIN)/python benchmarks/overload.py

bench-balancers: install  ## power_of_two vs peak_ewma vs least_squares, one replica 3x slower and equal
	$(BIN)/python benchmarks/balancers.py

bench-autoscale: bench-deps  ## burst at zero replicas, a load step up and down, 10 min of constant load
	$(BIN)/python benchmarks/autoscale.py

clean:
	rm -rf $(VENV) .steadyserve .pytest_cache .mypy_cache .ruff_cache
