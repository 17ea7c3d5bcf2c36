# Sourced by build.sh and run-demo.sh: podman as this kind of host needs it. The kernel here refuses
# crun and podman's default ulimits, and overlay storage: runc, vfs, explicit ulimits, host network.
# Elsewhere set PODMAN_GLOBAL="" and PODMAN_RUN="" to use podman's defaults.
PODMAN_GLOBAL=${PODMAN_GLOBAL---runtime runc --storage-driver vfs}
PODMAN_RUN=${PODMAN_RUN---network host --ulimit nofile=1024:1024 --ulimit nproc=1000:1000}
# shellcheck disable=SC2086
podman_() { podman $PODMAN_GLOBAL "$@"; }
