#!/usr/bin/env bash
# A federation of containers on this host, to the end: one coordinator and two sites, TLS with
# registered site keys, on loopback (host network). Builds the image first if it is missing.
#
#   deploy/containers/run-demo.sh [DIR]     # DIR (default: a new /var/tmp/fahr-demo.*) keeps
#                                           # configs, certificates, site data, workdirs and logs
# Exit code 0 only if the federation finished and both sites wrote their reports.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/podman.sh"
port=${PORT:-8443}
rounds=${ROUNDS:-2}
demo=${1:-$(mktemp -d /var/tmp/fahr-demo.XXXXXX)}
sites=(site1 site2)
started=$(date +%s)

image=localhost/fahr:latest
podman_ image exists "$image" || "$here/build.sh"

# shellcheck disable=SC2086
run() { podman_ run --rm $PODMAN_RUN "$@"; }

echo "demo folder: $demo"
mkdir -p "$demo/server/etc/keys" "$demo/server/state" "$demo/sim"
for s in "${sites[@]}"; do mkdir -p "$demo/$s/etc" "$demo/$s/state"; done
chown -R 10001:10001 "$demo"  # the image's unprivileged user writes only what is mounted for it

# One container does the set-up (each container start copies the image under vfs storage: minutes
# here): the coordinator's CA and TLS certificate for the name the sites dial, each site's key pair,
# and two semi-synthetic sites from the faces bundled in the image. The certificate also names
# 127.0.0.1: a SuperLink bound to 0.0.0.0 starts its ServerApp runtime (Flower's SuperExec) against
# 127.0.0.1, checking the certificate for that address.
setup="fahr certs init --out /demo/server/etc/certs --host localhost --host 127.0.0.1"
for s in "${sites[@]}"; do setup="$setup && fahr certs site --out /demo/$s/etc --site $s"; done
setup="$setup && fahr cohort simulate --out /demo/sim --sizes 60,60 --mean-ages 50,65 --rates 0.03,0.03"
setup="$setup --names $(IFS=,; echo "${sites[*]}")"
run -v "$demo:/demo" "$image" sh -c "$setup"
for s in "${sites[@]}"; do
    cp "$demo/$s/etc/$s.pub" "$demo/server/etc/keys/"   # the public half goes to the coordinator
    cp "$demo/server/etc/certs/ca.crt" "$demo/$s/etc/"  # the CA certificate goes to the site
done

keys=$(printf '"keys/%s.pub", ' "${sites[@]}")
cat > "$demo/server/etc/server.toml" <<TOML
[federation]
rounds = $rounds
min_sites = 2
address = "0.0.0.0"
port = $port
workdir = "/var/lib/fahr"
round_timeout_s = 900
join_timeout_s = 600

[model]
arch = "vit_micro"
img_size = 112

[security]
ca_cert = "certs/ca.crt"
server_cert = "certs/server.crt"
server_key = "certs/server.key"
site_keys = [${keys%, }]
TOML
for s in "${sites[@]}"; do
    cat > "$demo/$s/etc/site.toml" <<TOML
[site]
name = "$s"
data = "/data"
workdir = "/var/lib/fahr"

[privacy]
epsilon = 8.0

[train]
local_epochs = 1
batch_size = 16
threads = 1

[connection]
superlink = "localhost:$port"
root_certificates = "ca.crt"
auth_key = "$s.key"

[alignment]
workers = 1
TOML
done
chown -R 10001:10001 "$demo"

podman_ rm -f fahr-demo-coordinator "${sites[@]/#/fahr-demo-}" >/dev/null 2>&1 || true
# shellcheck disable=SC2086
podman_ run -d --name fahr-demo-coordinator $PODMAN_RUN \
    -v "$demo/server/etc:/etc/fahr:ro" -v "$demo/server/state:/var/lib/fahr" \
    "$image" fahr-server run --config /etc/fahr/server.toml --auto-resume
for s in "${sites[@]}"; do
    # shellcheck disable=SC2086
    podman_ run -d --name "fahr-demo-$s" $PODMAN_RUN \
        -v "$demo/$s/etc:/etc/fahr:ro" -v "$demo/sim/$s:/data:ro" -v "$demo/$s/state:/var/lib/fahr" \
        "$image" fahr-client start --site "$s" --config /etc/fahr/site.toml
done
# the coordinator's console, as an operator would watch it, until the federation ends
podman_ logs -f fahr-demo-coordinator &
code=$(podman_ wait fahr-demo-coordinator)
wait
for s in "${sites[@]}"; do  # each site's own view, from its still running container
    echo "--- fahr-client status --site $s"
    podman_ exec "fahr-demo-$s" fahr-client status --site "$s" --config /etc/fahr/site.toml || true
    podman_ logs "fahr-demo-$s" > "$demo/$s/container.log" 2>&1 || true
    podman_ rm -f "fahr-demo-$s" >/dev/null
done
podman_ rm -f fahr-demo-coordinator >/dev/null
echo "--- fahr-server status"
run -v "$demo/server/etc:/etc/fahr:ro" -v "$demo/server/state:/var/lib/fahr:ro" "$image" \
    fahr-server status --config /etc/fahr/server.toml || true
ok=0
[ "$code" = 0 ] && [ -f "$demo/server/state/run.json" ] || ok=1
for s in "${sites[@]}"; do [ -f "$demo/$s/state/report/report.html" ] || ok=1; done
echo "coordinator exit code $code; $(( $(date +%s) - started )) s; federation report: $demo/server/state/report/report.html"
exit $ok
