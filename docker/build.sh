#!/usr/bin/env bash
# Build the training image from the repository root: docker/build.sh [TAG]   (default barlowtwins-service:latest)
# BASE_IMAGE=... picks the base (default python:3.11-slim-bookworm; `make image-base` makes one offline).
set -euo pipefail
cd "$(dirname "$0")/.."
tag="${1:-barlowtwins-service:latest}"
args=(-f docker/Dockerfile -t "$tag"
      --build-arg "VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)"
      --build-arg "REVISION=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
      --build-arg "CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)")
if [ -n "${BASE_IMAGE:-}" ]; then
    args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
fi
if [ "$(docker/engine.sh name)" = podman ]; then
    args+=(--network=host)
    # Where pip is configured machine-wide (a local package mirror, a CA bundle), pip inside the build uses the same
    # configuration: podman can mount volumes into a build, Docker cannot (there pip uses PyPI directly).
    if [ -f /etc/xdg/pip/pip.conf ]; then
        args+=(-v /etc/xdg/pip:/etc/xdg/pip:ro)
        for dir in $(grep -ohE '(file://)?/[^ ]+' /etc/xdg/pip/pip.conf | sed 's|^file://||' | xargs -n1 dirname | sort -u); do
            case "$dir" in /etc/xdg/pip) ;; *) [ -d "$dir" ] && args+=(-v "$dir:$dir:ro") ;; esac
        done
    fi
    for bundle in /etc/ssl/certs/ca-certificates.crt; do
        [ -f "$bundle" ] && args+=(-v "$bundle:$bundle:ro")
    done
fi
previous="$(docker/engine.sh image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)"
docker/engine.sh build "${args[@]}" .
# The image this tag named before is 6 GB of disk that nothing uses any more.
current="$(docker/engine.sh image inspect --format '{{.Id}}' "$tag")"
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
    docker/engine.sh rmi "$previous" >/dev/null 2>&1 || true
fi
