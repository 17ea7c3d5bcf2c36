#!/usr/bin/env bash
# Prepares the GPU recipe's one call on the device machine (docs/models.md#the-gpu-recipe), here,
# once: the split's aligned faces as one pack (.gpu/faces.tar), and, as wheels for the device
# image's Python 3.12, the packages fahr imports that the image lacks, at the versions this
# checkout's .venv tests (.whl/). Both folders are ignored by git; the call carries them.
#
#   bash benchmarks/gpu_prepare.sh [FACES [ALIGNMENT_CACHE]]   # default ../shared/data/utkface
set -euo pipefail
cd "$(dirname "$0")/.."
faces=${1:-../shared/data/utkface}
cache=${2:-}
# The image holds torch, timm, numpy, pandas, scipy, matplotlib, safetensors and formulaic (the
# device tool's package list); these are the rest of what the recipe's imports reach.
missing="opacus lifelines autograd autograd-gamma cryptography cffi pycparser pycryptodome"

mkdir -p .gpu .whl
if [ ! -f .gpu/faces.tar ]; then
  .venv/bin/python benchmarks/gpu_recipe.py --data "$faces" ${cache:+--aligned "$cache"} --pack .gpu/faces.tar
fi
platforms=(--platform manylinux1_x86_64 --platform manylinux2014_x86_64)
for n in $(seq 17 39); do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
for name in $missing; do
  version=$(.venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
  # autograd-gamma 0.5.0 has no wheel at all: built here, pure Python (py3-none-any), it runs there
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "$name==$version" 2>/dev/null ||
    python3 -m pip wheel -q --no-deps -w .whl "$name==$version"
done
du -sh .gpu .whl
git ls-files -z | xargs -0 du -cb | tail -1 | awk '{printf "tracked files: %.1f MiB\n", $1 / 2^20}'
