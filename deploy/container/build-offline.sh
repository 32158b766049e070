#!/usr/bin/env bash
# Builds meter's image from deploy/container/Dockerfile without pulling anything from a
# container registry, and runs `meter --version` inside it. CI uses this (make validate-deploy);
# on a machine that can pull images, plain `docker build` or `buildah bud` is enough.
#
#   deploy/container/build-offline.sh [TAG]        (from the repository root, as root)
#
# 1. Base images: `localhost/meter-base:bookworm` (Debian bookworm minbase with python3 and
#    venv, made with debootstrap from the machine's own Debian mirror) stands in for
#    python:3.11-slim-bookworm, and `localhost/meter-build-base:bookworm` (the same plus gcc
#    and the Python headers) for python:3.11-bookworm. Made once, then reused.
# 2. The build context: the tracked source tree plus a wheelhouse of meter's dependencies and
#    build requirements, downloaded with the host's pip, so the build needs no index.
# 3. buildah bud with chroot isolation (no container runtime needed), docker format (keeps
#    HEALTHCHECK), then `meter --version` and the compiled-parser check in a container of it.
set -euo pipefail
cd "$(dirname "$0")/../.."
TAG=${1:-localhost/meter:ci}
PYTHON=${PYTHON:-.venv/bin/python}
WORK=${WORK:-build/image}
BASE=localhost/meter-base:bookworm
BUILD_BASE=localhost/meter-build-base:bookworm
ISOLATION=(--isolation chroot)

log() { printf '%s build-offline: %s\n' "$(date +%T)" "$*" >&2; }

debian_mirror() {
    # The first Debian URI apt uses here (deb822 or one-line format).
    local uri
    uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    [ -n "$uri" ] || uri=$(awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | head -n1)
    [ -n "$uri" ] || { echo "no Debian mirror found in apt's sources" >&2; return 1; }
    printf '%s\n' "$uri"
}

if ! buildah inspect --type image "$BASE" >/dev/null 2>&1; then
    log "making $BASE with debootstrap"
    rootfs="$WORK/rootfs"
    rm -rf "$rootfs" && mkdir -p "$rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv bookworm "$rootfs" "$(debian_mirror)" \
        >"$WORK/debootstrap.log" 2>&1 || { tail -n 20 "$WORK/debootstrap.log" >&2; exit 1; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | buildah import - "$BASE" >/dev/null 2>&1 \
        || tar -C "$rootfs" -c . | podman import -q - "$BASE" >/dev/null
    rm -rf "$rootfs"
fi
if ! buildah inspect --type image "$BUILD_BASE" >/dev/null 2>&1; then
    log "making $BUILD_BASE"
    ctr=$(buildah from "$BASE")
    buildah run "${ISOLATION[@]}" "$ctr" -- sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends gcc libc6-dev python3-dev >/dev/null \
        && rm -rf /var/lib/apt/lists/*'
    buildah commit -q "$ctr" "$BUILD_BASE" >/dev/null
    buildah rm "$ctr" >/dev/null
fi

log "build context"
ctx="$WORK/context"
rm -rf "$ctx" && mkdir -p "$ctx/wheelhouse"
git ls-files -co --exclude-standard | grep -v -E '^(build|dist)/' | tar -cf - -T - | tar -xf - -C "$ctx"
"$PYTHON" - "$ctx/wheelhouse" <<'PY'
import subprocess, sys, tomllib
doc = tomllib.load(open("pyproject.toml", "rb"))
reqs = list(doc["project"]["dependencies"]) + list(doc["build-system"]["requires"])
out = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--dest", sys.argv[1], *reqs],
                     capture_output=True, text=True)
if out.returncode:
    sys.exit(out.stdout + out.stderr)
PY

log "buildah bud"
buildah rmi "$TAG" >/dev/null 2>&1 || true  # a rebuild replaces the tag instead of piling up images
buildah bud "${ISOLATION[@]}" --format docker --layers=false --quiet \
    --build-arg BUILD_IMAGE="$BUILD_BASE" --build-arg PYTHON_IMAGE="$BASE" \
    --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/src/wheelhouse \
    -f deploy/container/Dockerfile -t "$TAG" "$ctx" >/dev/null

# The build stage's image is left untagged; drop it (and any other dangling image) now.
buildah rmi --prune >/dev/null 2>&1 || true

log "smoke test"
ctr=$(buildah from "$TAG")
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
# Run as the image's user, with its entrypoint's interpreter: what a pod would run.
buildah run "${ISOLATION[@]}" --user 10001:10001 "$ctr" -- /opt/meter/bin/meter --version
buildah run "${ISOLATION[@]}" --user 10001:10001 "$ctr" -- /opt/meter/bin/python -c \
    "import meter.parser, meter._parser as p; assert meter.parser.COMPILED; print('compiled parser', p.__file__)"
buildah inspect --type image --format '{{.Docker.Config.User}} {{.Docker.Config.Healthcheck.Test}}\n' "$TAG"
log "done: $TAG"
