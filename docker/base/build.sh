#!/usr/bin/env bash
# Build the base images locally, for machines with no container registry:
#   debian:bookworm-slim  <- debootstrap --variant=minbase from the host's own Debian mirror
#   python:3.11-slim      <- docker/base/Dockerfile (Debian's python3 3.11 in a venv)
# so the project's Dockerfile (FROM python:3.11-slim) builds without pulling anything.
# Idempotent: does nothing when python:3.11-slim exists. Needs root, debootstrap and a running engine
# (DOCKER_HOST). Elsewhere, `docker pull python:3.11-slim` does the same job.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

if docker image inspect python:3.11-slim >/dev/null 2>&1; then
    exit 0
fi
if ! command -v debootstrap >/dev/null; then
    # A machine with a registry needs none of this.
    exec docker pull python:3.11-slim
fi
if ! docker image inspect debian:bookworm-slim >/dev/null 2>&1; then
    # The host's own Debian mirror (the first one named), else the public one.
    mirror=$( { grep -h -oP '^URIs:\s*\K\S+' /etc/apt/sources.list.d/*.sources 2>/dev/null \
                || grep -h -oP '^deb\s+\K(http\S+)' /etc/apt/sources.list 2>/dev/null; } | head -n1 || true)
    mirror=${mirror:-http://deb.debian.org/debian}
    security=${mirror%/debian}/debian-security
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    debootstrap --variant=minbase bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
        || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
    # bookworm's own suites only (never the host's third-party repos or another release's).
    : >"$work/rootfs/etc/apt/sources.list"
    cat >"$work/rootfs/etc/apt/sources.list.d/debian.sources" <<SOURCES
Types: deb
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
    rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/*
    tar -C "$work/rootfs" -c . | docker import --change 'CMD ["bash"]' - debian:bookworm-slim >/dev/null
    rm -rf "$work"
    trap - EXIT
fi

# The host's extra CA certificates (e.g. a TLS-intercepting egress), so pip works in builds.
mkdir -p "$here/certs"
trap 'rm -rf "$here/certs"' EXIT
cp /usr/local/share/ca-certificates/*.crt "$here/certs/" 2>/dev/null || true
docker build --quiet -t python:3.11-slim "$here" >/dev/null
