#!/usr/bin/env bash
# Build the fahr image locally: a Debian bookworm base from Debian's own packages (no registry),
# then the Containerfile from the collected wheels. The coordinator and the sites run the same image.
#
#   deploy/containers/build.sh              # the CPU image localhost/fahr:VERSION (and :latest)
#   VARIANT=cuda deploy/containers/build.sh # the same with triton, for torch.compile (GPU hosts)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/podman.sh"
variant=${VARIANT:-cpu}
base=localhost/fahr-base:bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if ! podman_ image exists "$base"; then
    rootfs=$(mktemp -d /var/tmp/fahr-rootfs.XXXXXX)
    echo "building $base with debootstrap into $rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$mirror"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | podman_ import --message "debootstrap minbase bookworm" - "$base"
    rm -rf "$rootfs"
fi

[ -f "$here/wheels-$variant/FAHR_WHEEL" ] || VARIANT=$variant "$here/wheelhouse.sh"
version=$(sed -E 's/^fahr-([^-]+)-.*/\1/' "$here/wheels-$variant/FAHR_WHEEL")
suffix=$([ "$variant" = cpu ] && echo "" || echo "-$variant")
# --layers=false: one working container and one commit for the whole file (with layers, vfs copies
# the whole installation once per step). Podman 4.3 with vfs storage (this host) sometimes does not
# exit after "Successfully tagged", holding the storage lock: once the image id is written, give it
# a minute, then end it.
iid=$(mktemp)
# shellcheck disable=SC2086
podman_ build $PODMAN_RUN --layers=false --build-arg "WHEELS=wheels-$variant" --iidfile "$iid" \
    -t "localhost/fahr:$version$suffix" -t "localhost/fahr:latest$suffix" -f "$here/Containerfile" "$here" &
pid=$!
while kill -0 "$pid" 2>/dev/null && [ ! -s "$iid" ]; do sleep 5; done
for _ in $(seq 12); do kill -0 "$pid" 2>/dev/null || break; sleep 5; done
kill "$pid" 2>/dev/null || true
wait "$pid" 2>/dev/null || true
[ -s "$iid" ] || { echo "error: building the image failed" >&2; exit 1; }
rm -f "$iid"
podman_ images --filter "reference=localhost/fahr*"
