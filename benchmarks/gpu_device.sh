#!/usr/bin/env bash
# The GPU recipe's call on the device machine (docs/models.md#the-gpu-recipe), run from the
# repository root there with .gpu and .whl carried (benchmarks/gpu_prepare.sh makes both). It
# installs the carried wheels, makes fahr's packages importable from the working tree under their
# import names (setup.py's PACKAGE_DIRS: a wheel of fahr would carry the demo data a second time),
# then runs the recipe into $OUT, inside the call's 10 minutes. With arguments it runs those
# instead, in the same set-up (a second, shorter call: benchmarks/dp_cost.py, say).
set -uo pipefail
: "${OUT:?the device machine sets OUT}"
exec > >(tee -a "$OUT/gpu_recipe.log") 2>&1  # the log comes back even if the set-up fails
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
df -h /dev/shm /tmp  # the loader's workers hand batches over in shared memory
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl || exit 1
python3 - <<'PY' || exit 1
import ast
from pathlib import Path

tree = ast.parse(Path("setup.py").read_text())
assigned = {t.id: n.value for n in tree.body if isinstance(n, ast.Assign) for t in n.targets}
src = Path("/tmp/src")
src.mkdir(exist_ok=True)
for name, folder in ast.literal_eval(assigned["PACKAGE_DIRS"]).items():
    if not (src / name).exists():
        (src / name).symlink_to(Path(folder).resolve())
PY
export PYTHONPATH=/tmp/src:/tmp/site PYTHONUNBUFFERED=1
if [ $# -gt 0 ]; then
  exec "$@"
fi
# The recipe's clock starts after its imports (about 15 s); its deadline leaves room for them
# and for the JSON it writes on the way out, and the timeout is the backstop.
timeout 570 python3 benchmarks/gpu_recipe.py --faces .gpu/faces.tar --out "$OUT" \
  --work "$(mktemp -d /tmp/fahr-gpu-recipe.XXXX)" --deadline 530
