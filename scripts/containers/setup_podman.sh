#!/usr/bin/env bash
# Make a Debian 12 machine without Docker able to build and run dl-inference's images: Debian's podman runs the
# containers, and Debian's docker-compose 1.29 drives podman's Docker-compatible API socket. Idempotent; run
# as root. Afterwards: export DOCKER_HOST=unix://$PODMAN_SOCKET (the script prints it).
#
# What this machine needed, and why (found on a 2-core Debian 12 VM, no systemd, cgroup v1):
# * runtime runc, cgroup manager cgroupfs: there is no systemd to own cgroups;
# * default ulimits nofile 20000 / nproc 32768: podman's defaults (as root) are higher than the hard limits
#   this machine gives processes (ulimit -Hn 20000), and runc may not raise them ("error setting rlimits");
# * the API socket is started by hand (`podman system service`), since there is no systemd socket unit.
# Podman runs HEALTHCHECKs from systemd timers, so here they do not run by themselves: the compose test runs
# `podman healthcheck run` itself.
set -euo pipefail

PODMAN_SOCKET=${PODMAN_SOCKET:-/run/podman/podman.sock}
PACKAGES=(podman runc docker-compose debootstrap netavark aardvark-dns iptables)
CONF=/etc/containers/containers.conf.d/50-dl-inference.conf

if [[ $(id -u) != 0 ]]; then
    echo "setup_podman.sh: run as root (it installs packages and starts podman's API service)" >&2
    exit 1
fi

missing=()
for package in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' || missing+=("$package")
done
if ((${#missing[@]})); then
    echo "installing ${missing[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

wanted=$(cat <<'EOF'
# Written by dl_inference's scripts/containers/setup_podman.sh (see there why).
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
)
if [[ ! -f $CONF ]] || [[ $(cat "$CONF") != "$wanted" ]]; then
    mkdir -p "$(dirname "$CONF")"
    printf '%s\n' "$wanted" >"$CONF"
    echo "wrote $CONF"
fi

api_answers() {
    [[ -S $PODMAN_SOCKET ]] && curl -sf --max-time 5 --unix-socket "$PODMAN_SOCKET" http://d/_ping >/dev/null
}
if ! api_answers; then
    rm -f "$PODMAN_SOCKET"
    mkdir -p "$(dirname "$PODMAN_SOCKET")"
    # --time=0: never exit for idleness. Detached from this shell, so it outlives the caller; started from /
    # because conmon inherits its working directory, and every later container start fails ("write child:
    # broken pipe") once the caller's folder is gone (a removed checkout).
    (cd / && exec setsid nohup podman system service --time=0 "unix://$PODMAN_SOCKET") \
        >/var/log/podman-service.log 2>&1 </dev/null &
    for _ in $(seq 50); do
        api_answers && break
        sleep 0.2
    done
    api_answers || { echo "podman system service did not answer on $PODMAN_SOCKET (/var/log/podman-service.log)" >&2; exit 1; }
    echo "podman API service started on $PODMAN_SOCKET (log: /var/log/podman-service.log)"
fi
echo "export DOCKER_HOST=unix://$PODMAN_SOCKET"
