#!/usr/bin/env bash
# Run HERE (a machine that reaches PyPI, with .venv and ../shared/data) before a GPU run: fills
#   .whl/         wheels for Python 3.12 / manylinux x86_64 of what the GPU image lacks
#   .gpu-assets/  assets.tar.xz: the reference data (../shared/data) and SmolLM2's tokenizer
# Both folders are ignored by git; the GPU runner carries them with the checkout (64 MiB in all,
# checked below). benchmarks/gpu_check.sh installs the wheels there and unpacks the assets.
#
#   benchmarks/prepare_gpu_assets.sh                       # everything (about 56 MiB)
#   WITH_MATPLOTLIB=0 benchmarks/prepare_gpu_assets.sh     # without matplotlib (about 16 MiB; the
#                                                          # CLI tests that draw a heatmap then fail there)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
DATA=${DEPTHCUT_DATA_DIR:-$(cd .. && pwd)/shared/data}
WITH_MATPLOTLIB=${WITH_MATPLOTLIB:-1}
# bitsandbytes ships kernels for every CUDA and ROCm release (43 MB); keep the CPU one and these.
BNB_KEEP=${BNB_KEEP:-cuda130 cuda132}
LIMIT_MIB=${LIMIT_MIB:-60}

# The versions this checkout is tested with (its .venv), else these.
declare -A DEFAULT=([datasets]=5.2.0 [dill]=0.4.1 [multiprocess]=0.70.19 [xxhash]=4.1.0 [gguf]=0.19.0
  [pytest]=9.2.0 [pluggy]=1.7.0 [iniconfig]=2.3.1 [Pygments]=2.21.0 [matplotlib]=3.11.2 [contourpy]=1.3.3
  [cycler]=0.12.1 [fonttools]=4.68.0 [kiwisolver]=1.5.1 [pillow]=13.0.0 [pyparsing]=3.3.3
  [python-dateutil]=2.9.0.post0 [six]=1.17.0 [lm_eval]=0.4.13 [sacrebleu]=2.6.0 [portalocker]=4.4.2
  [colorama]=0.4.6 [lxml]=6.1.3 [tabulate]=0.10.0 [chardet]=6.0.0.post1)
# lm-eval (a core dependency: evaluation runs as its model) and what importing its evaluator pulls in.
NAMES=(datasets dill multiprocess xxhash gguf pytest pluggy iniconfig Pygments
  lm_eval sacrebleu portalocker colorama lxml tabulate chardet)
[ "$WITH_MATPLOTLIB" = 1 ] && NAMES+=(matplotlib contourpy cycler fonttools kiwisolver pillow pyparsing python-dateutil six)
SPECS=(bitsandbytes==0.50.2)
for name in "${NAMES[@]}"; do
  version=$("$PYTHON" -c "import importlib.metadata as m; print(m.version('$name'))" 2>/dev/null || echo "${DEFAULT[$name]}")
  SPECS+=("$name==$version")
done

rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${SPECS[@]}"

# Slim bitsandbytes: drop the native libraries of the CUDA/ROCm/XPU releases not kept (and their
# RECORD lines, so that the wheel stays consistent).
BNB_KEEP="$BNB_KEEP" python3 - <<'EOF'
import os, pathlib, re, zipfile
keep = os.environ["BNB_KEEP"].split()
for wheel in pathlib.Path(".whl").glob("bitsandbytes-*.whl"):
    def dropped(name):
        match = re.fullmatch(r"bitsandbytes/libbitsandbytes_(\w+)\.(so|dll|dylib)", name)
        return bool(match) and match.group(1) != "cpu" and match.group(1) not in keep
    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            if dropped(info.filename):
                continue
            data = source.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = ("\n".join(l for l in lines if not dropped(l.split(",")[0])) + "\n").encode()
            target.writestr(info, data)
    before, after = wheel.stat().st_size, slim.stat().st_size
    slim.replace(wheel)
    print(f"{wheel.name}: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB (kept cpu, {', '.join(keep)})")
EOF

# Assets: the reference data and SmolLM2's tokenizer, compressed (31 MiB of text -> about 7 MiB).
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/assets"
cp -r "$DATA" "$STAGE/assets/data"
"$PYTHON" benchmarks/gpu_check.py tokenizer --device cpu --out "$STAGE/assets/smollm2-tokenizer"
rm -rf .gpu-assets && mkdir -p .gpu-assets
tar -C "$STAGE" -cJf .gpu-assets/assets.tar.xz assets

TOTAL=$(du -sbc .whl .gpu-assets $(git ls-files) 2>/dev/null | tail -1 | cut -f1)
echo "wheels: $(du -sh .whl | cut -f1), assets: $(du -sh .gpu-assets | cut -f1); with the tracked files" \
  "$((TOTAL / 1048576)) MiB travel (limit 64 MiB)"
if [ "$TOTAL" -gt $((LIMIT_MIB * 1048576)) ]; then
  echo "prepare_gpu_assets: more than $LIMIT_MIB MiB would travel; try WITH_MATPLOTLIB=0" >&2
  exit 1
fi
