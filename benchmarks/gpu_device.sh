#!/usr/bin/env bash
# The GPU recipe's one call on the device machine (docs/models.md#the-gpu-recipe), run from the
# repository root there with .gpu and .whl carried (benchmarks/gpu_prepare.sh makes both). It
# installs the carried wheels, makes fahr's packages importable from the working tree under their
# import names (setup.py's PACKAGE_DIRS: a wheel of fahr would carry the demo data a second time),
# then runs the recipe (its results, curves and weights to $OUT) and the DP cost benchmark, both
# inside the call's 10 minutes. Extra arguments go to gpu_recipe.py.
set -uo pipefail
: "${OUT:?the device machine sets OUT}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl || exit 1
python3 - <<'PY' || exit 1
import ast
from pathlib import Path

tree = ast.parse(Path("setup.py").read_text())
assigned = {t.id: n.value for n in tree.body if isinstance(n, ast.Assign) for t in n.targets}
dirs = ast.literal_eval(assigned["PACKAGE_DIRS"])
src = Path("/tmp/src")
src.mkdir(exist_ok=True)
for name, folder in dirs.items():
    if not (src / name).exists():
        (src / name).symlink_to(Path(folder).resolve())
PY
export PYTHONPATH=/tmp/src:/tmp/site PYTHONUNBUFFERED=1
log="$OUT/gpu_recipe.log"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$log"
timeout 525 python3 benchmarks/gpu_recipe.py --faces .gpu/faces.tar --out "$OUT" --deadline 500 "$@" 2>&1 \
  | tee -a "$log"
timeout 45 python3 benchmarks/dp_cost.py --arch vit_base --batch 64 --steps 8 --device cuda 2>&1 | tee -a "$log"
