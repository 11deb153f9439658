# One entry point per job. `make setup` builds .venv (CPU torch by default: set TORCH=torch for a CUDA build).
PY ?= .venv/bin/python
TORCH ?= torch==2.13.0
RANK ?= 64
ALPHA ?= $(RANK)
MODEL ?=
ARGS ?=

.PHONY: setup lint test test-fast train smoke params plan bench chat export eval clean

setup: .venv/.installed

.venv/.installed: pyproject.toml constraints.txt
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q "$(TORCH)"
	.venv/bin/pip install -q -c constraints.txt -e ".[test]"
	touch $@

lint: setup
	$(PY) -m ruff check .

# On every core: one pytest-xdist worker per core, each with one torch thread (tests/conftest.py). worksteal: a
# worker that runs out of tests takes queued ones from the other, so no core idles while the last ones run.
TEST_FLAGS = -q -n auto --dist worksteal
test: setup
	$(PY) -m pytest $(TEST_FLAGS)

test-fast: setup
	$(PY) -m pytest $(TEST_FLAGS) -m "not slow"

clean:
	rm -rf .venv .pytest_cache runs/smoke

# With CONFIG=FILE the file holds the run (configs/), and RANK, ALPHA and MODEL override it only when given.
CONFIG ?=
GIVEN = $(filter command line environment,$(origin $(1)))
TRAIN_FLAGS = $(if $(CONFIG),--config $(CONFIG) $(if $(call GIVEN,RANK),--rank $(RANK)) \
	$(if $(call GIVEN,ALPHA),--alpha $(ALPHA),$(if $(call GIVEN,RANK),--alpha $(RANK))),--rank $(RANK) --alpha $(ALPHA))
train: setup
	$(PY) train.py $(TRAIN_FLAGS) $(if $(MODEL),--model $(MODEL)) $(ARGS)

smoke: setup
	$(PY) -m scripts.smoke

params: setup
	$(PY) train.py --rank $(RANK) --dry-run $(if $(MODEL),--model $(MODEL)) $(ARGS)

# The same: the parameter table and the plan of one step (e.g. ARGS="--device cuda --quantize nf4 --fit-memory 24GiB").
plan: params

BASELINE ?=
BENCH_ARGS ?=
bench: setup
	$(PY) -m bench.bench $(if $(BASELINE),--baseline $(BASELINE)) $(BENCH_ARGS)
	$(if $(filter hf,$(BASELINE)),$(PY) -m bench.activation_bench)

ADAPTER ?=
chat: setup
	$(PY) chat.py $(if $(ADAPTER),--adapter $(ADAPTER)) $(ARGS)

# The adapter merged into its base (MODEL, default the one the adapter records), written to OUT for transformers,
# pipelines and llama.cpp: make export ADAPTER=runs/rank64/adapter OUT=runs/rank64/merged [ARGS="--dtype bfloat16"]
# OVERWRITE=1 replaces an earlier export in OUT (--overwrite).
OUT ?=
OVERWRITE ?=
EXPORT_FLAGS = $(if $(MODEL), --model $(MODEL))$(if $(filter-out 0,$(OVERWRITE)), --overwrite)
export: setup
	$(if $(and $(ADAPTER),$(OUT)),,$(error make export needs ADAPTER=<adapter folder> and OUT=<folder to write>))
	$(PY) -m tinyllama.export --adapter $(ADAPTER) --out $(OUT)$(EXPORT_FLAGS) $(ARGS)

# lm-evaluation-harness on an adapter (unmerged) or, with ARGS=--no-adapter, on the base it records; with MODEL and
# no ADAPTER, on that base alone, as before any adapter is trained (docs/eval.md):
# make eval ADAPTER=runs/rank64/adapter TASKS=hellaswag,arc_easy ARGS="--limit 200 --output results/"
TASKS ?=
eval: setup
	$(if $(and $(or $(ADAPTER),$(MODEL)),$(TASKS)),,$(error make eval needs TASKS=<task,task> and ADAPTER=<adapter folder> or MODEL=<base>))
	$(PY) eval.py $(if $(ADAPTER),--adapter $(ADAPTER),--no-adapter) --tasks $(TASKS)$(if $(MODEL), --model $(MODEL)) $(ARGS)
