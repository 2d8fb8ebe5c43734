#!/usr/bin/env bash
# A Debian bookworm base image with Python 3.11 and its headers (as python:3.11-slim has), made locally with
# debootstrap for machines that cannot pull from an image registry (this project's CI). Needs root and debootstrap.
# Usage: docker/base-image.sh [TAG]
set -euo pipefail
cd "$(dirname "$0")/.."
tag="${1:-localhost/debian-python:3.11-bookworm}"
if docker/engine.sh image inspect "$tag" >/dev/null 2>&1 \
    && docker/engine.sh run --rm "$tag" test -e /usr/include/python3.11/Python.h; then
    echo "$tag exists"
    exit 0
fi
rootfs="$(mktemp -d)"
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,libpython3.11-dev,ca-certificates bookworm "$rootfs" \
    "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >/dev/null
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* \
    "$rootfs"/usr/share/man/* "$rootfs"/var/log/*
tar -C "$rootfs" -c . | docker/engine.sh import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' - "$tag" >/dev/null
echo "made $tag"
