#!/usr/bin/env bash
# Build the fahr images locally: a Debian bookworm base from Debian's own packages (no registry),
# then the coordinator and site targets of the Containerfile from the collected wheels.
#
#   deploy/containers/build.sh              # CPU images fahr-coordinator:VERSION, fahr-site:VERSION
#   VARIANT=cuda deploy/containers/build.sh # the site image with the CUDA torch build (GPU hosts)
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
# Podman 4.3 with vfs storage (this host) sometimes does not exit after "Successfully tagged",
# holding the storage lock: once the image id is written, give it a minute, then end it.
build_target() {
    local target=$1 iid pid
    iid=$(mktemp)
    # shellcheck disable=SC2086
    podman_ build $PODMAN_RUN --build-arg "WHEELS=wheels-$variant" --target "$target" --iidfile "$iid" \
        -t "localhost/fahr-$target:$version$suffix" -t "localhost/fahr-$target:latest$suffix" \
        -f "$here/Containerfile" "$here" &
    pid=$!
    while kill -0 "$pid" 2>/dev/null && [ ! -s "$iid" ]; do sleep 5; done
    for _ in $(seq 12); do kill -0 "$pid" 2>/dev/null || break; sleep 5; done
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    [ -s "$iid" ] || { echo "error: building the $target image failed" >&2; exit 1; }
    rm -f "$iid"
}
for target in coordinator site; do
    build_target "$target"
done
podman_ images --filter "reference=localhost/fahr-*"
