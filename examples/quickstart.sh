#!/usr/bin/env bash
# Quick start: install bottle, build the bundle image and a demo agent image locally, and bring up
# examples/docker.toml with your terminal attached to a shell inside the bottle.
# Needs Linux, Python 3.11+ and a running Docker Engine. `bottle down docker-demo` removes the bottle.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
.venv/bin/pip install -q -e .

# A base image with Python: python:3.11-slim from a registry if docker can get it, else a Debian
# bookworm made here with debootstrap (needs root and `apt-get install debootstrap`; about a minute once).
base=python:3.11-slim
if ! docker image inspect "$base" >/dev/null 2>&1 && ! timeout 60 docker pull -q "$base" >/dev/null 2>&1; then
    base=bottle-local-python:bookworm
    if ! docker image inspect "$base" >/dev/null 2>&1; then
        echo "no registry: building $base with debootstrap" >&2
        rootfs=$(mktemp -d)
        trap 'rm -rf "$rootfs"' EXIT
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs/root" >/dev/null
        tar -C "$rootfs/root" -c . | docker import - "$base" >/dev/null
    fi
fi

.venv/bin/bottle bundle build --base "$base"
docker tag "$base" bottle-demo-agent:latest   # the demo agent: a shell (and Python) in a bottle
exec .venv/bin/bottle up -f examples/docker.toml
