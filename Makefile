# `make demo` and `make test` do all set-up on a fresh clone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0
STAMP := $(VENV)/.installed
MAKEFLAGS += --jobs=2

.PHONY: install demo test system-packages test-fast lint bench bench-ghbm bench-clusters bench-attacks bench-overlap bench-outer bench-outer-real bench-finetune clean

# where pip finds local wheels (this machine keeps its CPU torch wheel there); uv reads no pip
# configuration, so it is passed on (`=`: asked for only when the install runs)
FIND_LINKS = $(or $(PIP_FIND_LINKS),$(shell $(PY) -m pip config get global.find-links 2>/dev/null))

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# uv installs the same packages as pip in half the time (23 s against 54 s here), with the
	# CPU-only torch wheel where one is served locally; where either is missing, pip installs
	# them, preferring that wheel and falling back to the normal torch elsewhere. Neither
	# byte-compiles up front: Python compiles what it imports on first use (compiling every
	# file of torch and transformers cost 23 s more for torch alone on 2 cores)
	( $(BIN)/pip install -q uv && $(BIN)/uv pip install -q --python $(BIN)/python \
		$(addprefix --find-links ,$(FIND_LINKS)) "torch==$(TORCH_VERSION)+cpu" -e ".[dev]" ) || \
	( ( $(BIN)/pip install -q --no-compile "torch==$(TORCH_VERSION)+cpu" || \
		$(BIN)/pip install -q --no-compile "torch>=2.2" ) && \
		$(BIN)/pip install -q --no-compile -e ".[dev]" )
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/swarmtune demo --out ./demo-adapter

# the Debian packages some tests drive (Chromium for the status page, iptables for the firewall
# test) install while pip installs the Python side: prerequisites run side by side (--jobs=2)
test: $(STAMP) system-packages
	# in-process tests on both cores; then the real-peer tests (marked slow, all in
	# tests/integration) one at a time: each starts a swarm of processes that needs the cores,
	# and one beside it starves its rounds
	$(BIN)/python -m pytest -q -rs -n 2 -m "not slow"
	$(BIN)/python -m pytest -q -rs -m slow tests/integration

system-packages:
	.ci/ensure-browser
	.ci/ensure-iptables

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m "not slow and not p2pd"

# mypy reads the packages under the names they install as (swarmtune.*), through a tree of links
lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
	mkdir -p $(VENV)/typecheck/swarmtune
	for d in aggregation protocols node cli.py; do ln -sfn $(CURDIR)/$$d $(VENV)/typecheck/swarmtune/$$d; done
	cd $(VENV)/typecheck && ../bin/mypy -p swarmtune --config-file $(CURDIR)/pyproject.toml

bench: $(STAMP)
	$(BIN)/python bench/swarm_bench.py

bench-ghbm: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python bench/ghbm_bench.py

bench-clusters: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python bench/cluster_bench.py

bench-attacks: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python bench/attacks.py

# the outer-optimizer study (bench/outer_study.py; --quick for a small budget)
bench-outer: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python bench/outer_study.py

# the study's methods at its tuned lrs on real peers, beside the simulator (after bench-outer)
bench-outer-real: $(STAMP)
	$(BIN)/python bench/outer_real.py

# real fine-tuning on SmolLM2 (MODEL=DIR from bench/make_smollm2.py; about 40 min on 2 cores)
bench-finetune: $(STAMP)
	$(BIN)/python bench/finetune.py --model $(or $(MODEL),/tmp/smollm2-135m)

# MODEL=DIR also measures a local HF model dir (README, "Base model")
bench-overlap: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python bench/overlap.py $(if $(MODEL),--model $(MODEL))

# the swarm on tbf-limited links in network namespaces, direct and relayed (root)
bench-wan: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python bench/wan.py $(ARGS)

clean:
	rm -rf $(VENV) demo-adapter .pytest_cache
