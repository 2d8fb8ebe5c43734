#!/usr/bin/env bash
# The container engine: Docker where a daemon answers, podman (daemonless) otherwise; CONTAINER_ENGINE=docker|podman
# chooses. `docker/engine.sh name` prints the engine; any other arguments run it: docker/engine.sh images
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
engine="${CONTAINER_ENGINE:-}"
if [ -z "$engine" ]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
        engine=docker
    elif command -v podman >/dev/null; then
        engine=podman
    else
        echo "docker/engine.sh: neither a Docker daemon nor podman is available (make container-tools installs podman)" >&2
        exit 3
    fi
fi
if [ "${1:-}" = name ]; then
    echo "$engine"
    exit 0
fi
if [ "$engine" = podman ]; then
    export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/podman.conf}"
fi
exec "$engine" "$@"
