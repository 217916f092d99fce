#!/usr/bin/env bash
# Make the images' default base, localhost/debian-python:bookworm, without any container registry: debootstrap a
# minimal Debian 12 (python3 3.11, python3-venv, ca-certificates) into a folder and `podman import` it.
# Skipped when the image exists (--force rebuilds). Needs root, debootstrap and podman (setup_podman.sh).
#
#   scripts/containers/make_base_image.sh [--force]
#   BASE_IMAGE=localhost/debian-python:bookworm DEBIAN_MIRROR=http://deb.debian.org/debian   (the defaults)
#
# Where a registry is reachable, any python3.11+ image with python3-venv does instead, e.g.
# `--build-arg BASE_IMAGE=python:3.11-slim`.
set -euo pipefail

BASE_IMAGE=${BASE_IMAGE:-localhost/debian-python:bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm

if [[ ${1:-} != --force ]] && podman image exists "$BASE_IMAGE"; then
    echo "$BASE_IMAGE exists (--force to rebuild)"
    exit 0
fi

workdir=$(mktemp -d /var/tmp/dl-inference-base.XXXXXX)
trap 'rm -rf "$workdir"' EXIT
rootfs=$workdir/rootfs

echo "debootstrap $SUITE from $DEBIAN_MIRROR"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$SUITE" "$rootfs" "$DEBIAN_MIRROR" >"$workdir/debootstrap.log" 2>&1 \
    || { tail -20 "$workdir/debootstrap.log" >&2; exit 1; }

# What a container never needs: downloaded packages, package lists, documentation, translations.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
# debootstrap copies the host's resolver settings; the container runtime provides its own.
rm -f "$rootfs/etc/resolv.conf" "$rootfs/etc/hostname"

tar --numeric-owner -C "$rootfs" -c . | podman import --quiet \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --message "debootstrap --variant=minbase $SUITE + python3 python3-venv ca-certificates" \
    - "$BASE_IMAGE" >/dev/null
podman run --rm "$BASE_IMAGE" python3 -c 'import sys, venv, ensurepip; print("python", sys.version.split()[0])'
echo "made $BASE_IMAGE ($(podman image inspect --format '{{.Size}}' "$BASE_IMAGE" | numfmt --to=iec))"
