#!/usr/bin/env bash
# Build the CPU compose testbed's images (docker/compose.cpu.yml) without an image registry.
#
#   scripts/compose_images.sh            # base (cached), wheelhouse, then `docker-compose build`
#   scripts/compose_images.sh base       # only the base image
#   scripts/compose_images.sh wheelhouse # only build/wheelhouse
#
# No registry is reachable here, so nothing is pulled:
# - the base image (prfaas-base:bookworm) is a Debian bookworm root made by
#   `debootstrap --variant=minbase` with the few packages the testbed runs (python3 + venv for
#   prfaas, etcd-server for membership, iproute2 for `tc` on the WAN), then `docker import`ed.
#   It is built once: an existing image is kept (delete it to rebuild; about a minute).
# - the project and its Python dependencies come from the build context: build/wheelhouse, filled
#   here on the host with pip (torch from the CPU wheel pip finds on this machine), and installed
#   in the image with `pip install --no-index` (containers need no route to PyPI).
# Needs root (debootstrap) and a running Docker engine.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_IMAGE=${PRFAAS_BASE_IMAGE:-prfaas-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PACKAGES=python3,python3-venv,etcd-server,iproute2,ca-certificates
PIP=${PIP:-.venv/bin/pip}
PYTHON=${PYTHON:-.venv/bin/python}
WHEELHOUSE=build/wheelhouse

ROOTFS=  # the debootstrap root while one is built: removed on any exit
trap '[ -z "$ROOTFS" ] || rm -rf "$ROOTFS"' EXIT

log() { printf 'compose_images: %s\n' "$*" >&2; }

# Run a noisy command with its output in a log file, shown only when it fails.
quietly() {
    local out
    out=$(mktemp /tmp/prfaas-compose-images.XXXXXX)
    if ! "$@" >"$out" 2>&1; then
        tail -n 40 "$out" >&2
        rm -f "$out"
        log "failed: $*"
        return 1
    fi
    rm -f "$out"
}

base() {
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        log "$BASE_IMAGE exists (cached)"
        return
    fi
    if ! command -v debootstrap >/dev/null; then
        [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || {
            log "debootstrap missing (and cannot install it here): apt-get install debootstrap"
            exit 1
        }
        quietly apt-get update -qq
        DEBIAN_FRONTEND=noninteractive quietly apt-get install -y -qq debootstrap
    fi
    ROOTFS=$(mktemp -d /tmp/prfaas-rootfs.XXXXXX)
    local root=$ROOTFS
    log "debootstrap bookworm ($PACKAGES) into $root"
    quietly debootstrap --variant=minbase --include="$PACKAGES" bookworm "$root" "$MIRROR"
    # apt's lists and caches and the docs are not needed at run time (about 60 MB).
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin \
        "$root"/var/cache/apt/archives/*.deb "$root"/usr/share/doc/* "$root"/usr/share/man/*
    tar -C "$root" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
    rm -rf "$root"
    ROOTFS=
    log "$BASE_IMAGE built"
}

wheelhouse() {
    # deps/: the project's runtime dependencies (requirements.txt, pyproject.toml's list) as
    # wheels, fetched again only when that list changes (then the image's dependency stage is
    # rebuilt too). project/: the project's own wheel, rebuilt every time.
    local deps=$WHEELHOUSE/deps project=$WHEELHOUSE/project wanted
    wanted=$("$PYTHON" -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))")
    if [ ! -e "$deps/.complete" ] || [ "$wanted" != "$(cat "$deps/requirements.txt")" ]; then
        rm -rf "$deps"
        mkdir -p "$deps"
        printf '%s\n' "$wanted" > "$deps/requirements.txt"
        log "pip wheel: the project's dependencies into $deps"
        quietly "$PIP" wheel --wheel-dir "$deps" --requirement "$deps/requirements.txt"
        touch "$deps/.complete"
    fi
    # Reproducible (fixed zip timestamps): the same sources give the same wheel, and the image
    # build's cache holds (docker hashes COPY'd files' contents).
    rm -rf "$project"
    SOURCE_DATE_EPOCH=315532800 quietly "$PIP" wheel --no-deps --wheel-dir "$project" .
}

images() {
    base
    wheelhouse
    if docker compose version >/dev/null 2>&1; then
        docker compose -f docker/compose.cpu.yml build
    else
        docker-compose -f docker/compose.cpu.yml build
    fi
}

case "${1:-all}" in
    base) base ;;
    wheelhouse) wheelhouse ;;
    all) images ;;
    *) log "usage: $0 [base|wheelhouse|all]"; exit 2 ;;
esac
