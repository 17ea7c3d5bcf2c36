#!/usr/bin/env bash
# Collect every wheel the images install into deploy/containers/wheels-VARIANT/ (ignored by git), so
# an image is built offline from exactly the versions this machine tested: the fahr wheel built from
# the files git would release, and every other distribution at the version this environment runs
# (`pip freeze`), torch and torchvision included. That pair is PyPI's Linux build (CUDA 13): its
# libraries link the nvidia-* CUDA libraries at import, so even a CPU image carries them (about
# 3 GB); it runs on CPUs. PyTorch's CPU-only wheels are a different build this machine has not
# tested (a CPU torch beside PyPI's torchvision does not even import). The CPU variant leaves out
# only triton, the GPU kernel compiler behind torch.compile, which no CPU run uses.
#
#   deploy/containers/wheelhouse.sh                # CPU: the environment's wheels less triton
#   VARIANT=cuda deploy/containers/wheelhouse.sh   # the environment's wheels, triton included
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
py=${PYTHON:-$root/.venv/bin/python}
variant=${VARIANT:-cpu}
out=$here/wheels-$variant
rm -rf "$out" && mkdir -p "$out"

# the fahr wheel, built from a clean copy of the release files (never from a stale build/ folder)
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
(cd "$root" && git ls-files -co --exclude-standard | tar cf - -T -) | tar xf - -C "$src"
"$py" -m pip wheel -q --no-deps --no-build-isolation -w "$out" "$src"

# everything else at this environment's versions; dev tools and the optional insightface stay out
drop='^(fahr|pytest|ruff|iniconfig|pluggy|insightface)=='
[ "$variant" = cpu ] && drop='^(fahr|pytest|ruff|iniconfig|pluggy|insightface|triton)=='
"$py" -m pip freeze --exclude-editable | grep -v -i -E "$drop" | grep -v '^#' > "$out/requirements.txt"
# pip wheel, not download: a few dependencies (autograd-gamma) are sdists, built into wheels here
"$py" -m pip wheel -q --no-deps -w "$out" -r "$out/requirements.txt"
ls "$out"/fahr-*.whl | xargs -n1 basename > "$out/FAHR_WHEEL"
du -sh "$out"
