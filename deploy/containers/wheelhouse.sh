#!/usr/bin/env bash
# Collect every wheel the images install into deploy/containers/wheels/ (ignored by git), so an
# image is built offline from exactly the versions this machine tested: the fahr wheel built from
# the files git would release, and every other distribution at the version this environment runs
# (`pip freeze`), with torch and torchvision swapped for a CPU build (PyPI's Linux torch is the CUDA
# build: gigabytes a CPU site never uses). The CUDA variant of the site image keeps the CUDA pair.
#
#   deploy/containers/wheelhouse.sh            # CPU (TORCH / TORCHVISION below)
#   VARIANT=cuda deploy/containers/wheelhouse.sh   # the environment's own torch pair
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
if [ "$variant" = cpu ]; then
    drop='^(fahr|pytest|ruff|iniconfig|pluggy|insightface|torch|torchvision|triton|nvidia-.*|cuda-.*)=='
    # a CPU torch needs the CPU torchvision of the same release: PyPI's torchvision is the CUDA build
    # ("operator torchvision::nms does not exist" at import); both come from PyTorch's CPU index
    torch_pair=("${TORCH:-torch==2.13.0+cpu}" "${TORCHVISION:-torchvision==0.28.0+cpu}")
    index=(--extra-index-url "${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}")
else
    torch_pair=()
    index=()
fi
"$py" -m pip freeze --exclude-editable | grep -v -i -E "$drop" | grep -v '^#' > "$out/requirements.txt"
# pip wheel, not download: a few dependencies (autograd-gamma) are sdists, built into wheels here
"$py" -m pip wheel -q --no-deps "${index[@]}" -w "$out" -r "$out/requirements.txt" \
    "${torch_pair[@]}"
for pin in "${torch_pair[@]}"; do echo "$pin" >> "$out/requirements.txt"; done
ls "$out"/fahr-*.whl | xargs -n1 basename > "$out/FAHR_WHEEL"
du -sh "$out"
