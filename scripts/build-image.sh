#!/usr/bin/env bash
# Builds the Tether image (tether-head, tether-worker and tetherctl in one
# image). `make image` runs it.
#
# With a registry it runs `docker build -t IMAGE .`: the Dockerfile
# compiles the binaries in the official Rust image and copies them onto
# debian:bookworm-slim. First it checks that both base images are there or
# can be pulled (`docker image inspect`, then `docker manifest inspect`
# under a timeout); when one cannot, it says so in one line and builds
# without a registry instead:
#
#   1. scripts/container-base.sh: tether-base:bookworm, a Debian bookworm
#      base made by debootstrap from the Debian mirror (needs root and
#      debootstrap; skipped when the image exists);
#   2. cargo build --release --bins on this machine;
#   3. docker build -f deploy/Dockerfile.prebuilt on that base.
#
# which is what `sudo scripts/container-base.sh && make image-prebuilt
# RUNTIME_BASE=tether-base:bookworm` does by hand.
#
# Usage: scripts/build-image.sh [--auto | --dockerfile | --prebuilt]
#                               [--tag IMAGE] [--binaries DIR]
#   --auto        (default) the Dockerfile when its base images can be had,
#                 else the prebuilt path above
#   --dockerfile  always `docker build .` (fails where nothing can be pulled)
#   --prebuilt    always the prebuilt path (`make image-prebuilt`)
#   --tag IMAGE   the image to build (default: $IMAGE, or tether:dev)
#   --binaries DIR  take tether-head, tether-worker and tetherctl from DIR
#                 instead of `cargo build --release --bins` (prebuilt path)
# Environment: IMAGE, RUST_IMAGE (rust:1-bookworm), RUNTIME_BASE
#   (debian:bookworm-slim), TETHER_BASE_IMAGE (tether-base:bookworm, the
#   local base), CARGO (cargo), CARGO_FLAGS, TETHER_IMAGE_BINARIES (as
#   --binaries), PULL_CHECK_TIMEOUT (seconds a registry gets to answer; 20).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

image=${IMAGE:-tether:dev}
rust_image=${RUST_IMAGE:-rust:1-bookworm}
runtime_base=${RUNTIME_BASE:-debian:bookworm-slim}
local_base=${TETHER_BASE_IMAGE:-tether-base:bookworm}
cargo=${CARGO:-cargo}
pull_timeout=${PULL_CHECK_TIMEOUT:-20}
mode=auto
binaries=${TETHER_IMAGE_BINARIES:-}
while [ $# -gt 0 ]; do
    case $1 in
        --auto | --dockerfile | --prebuilt)
            mode=${1#--}
            shift
            ;;
        --tag)
            image=${2:?--tag needs an image name}
            shift 2
            ;;
        --binaries)
            binaries=${2:?--binaries needs a directory}
            shift 2
            ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "build-image.sh: unknown argument '$1' (try --help)" >&2
            exit 2
            ;;
    esac
done

log() { echo "build-image: $*" >&2; }

if ! timeout 30 docker version >/dev/null 2>&1; then
    log "no Docker engine answers (docker version failed); start one, e.g. sudo service docker start"
    exit 1
fi

# Whether an image is here or can be pulled. On failure `why` holds the
# registry's first line of error.
why=
available() {
    if docker image inspect "$1" >/dev/null 2>&1; then
        return 0
    fi
    local out
    if out=$(timeout "$pull_timeout" docker manifest inspect "$1" 2>&1 >/dev/null); then
        return 0
    fi
    why=$(printf '%s\n' "$out" | head -n 1)
    why=${why:-no answer within ${pull_timeout}s}
    return 1
}

started=$SECONDS
done_in() { log "built $image in $((SECONDS - started))s"; }

if [ "$mode" = auto ]; then
    mode=dockerfile
    for base in "$rust_image" "$runtime_base"; do
        if ! available "$base"; then
            log "cannot pull $base ($why)"
            log "no registry: building without one instead, from host-built binaries on $local_base"
            log "(to run this path directly: sudo scripts/container-base.sh && make image-prebuilt RUNTIME_BASE=$local_base)"
            mode=prebuilt
            runtime_base=
            break
        fi
    done
fi

if [ "$mode" = dockerfile ]; then
    log "docker build -t $image . (RUST_IMAGE=$rust_image, RUNTIME_BASE=$runtime_base)"
    docker build --build-arg "RUST_IMAGE=$rust_image" --build-arg "RUNTIME_BASE=$runtime_base" \
        -t "$image" .
    done_in
    exit 0
fi

# ---- prebuilt: no registry needed -------------------------------------------
# The runtime base: RUNTIME_BASE when it is here or pullable, else the
# local base, built when missing.
if [ -n "$runtime_base" ] && ! available "$runtime_base"; then
    log "cannot pull $runtime_base ($why); using $local_base instead"
    runtime_base=
fi
if [ -z "$runtime_base" ]; then
    runtime_base=$local_base
    if ! docker image inspect "$runtime_base" >/dev/null 2>&1; then
        log "step 1/3: scripts/container-base.sh --tag $runtime_base (debootstrap; about 2 minutes)"
        if ! scripts/container-base.sh --tag "$runtime_base"; then
            log "could not build $runtime_base; it needs root and debootstrap:"
            log "    sudo apt-get install -y debootstrap && sudo scripts/container-base.sh"
            log "then run make image again"
            exit 1
        fi
    else
        log "step 1/3: $runtime_base exists (scripts/container-base.sh --force rebuilds it)"
    fi
fi

if [ -z "$binaries" ]; then
    log "step 2/3: $cargo build ${CARGO_FLAGS:+$CARGO_FLAGS }--release --bins"
    # shellcheck disable=SC2086 # CARGO_FLAGS is a list of flags
    "$cargo" build ${CARGO_FLAGS:-} --release --bins
    binaries=${CARGO_TARGET_DIR:-target}/release
else
    log "step 2/3: binaries from $binaries"
fi

# A context of its own holding only what Dockerfile.prebuilt copies.
mkdir -p target
context=$(mktemp -d target/image-context.XXXXXX)
trap 'rm -rf "$context"' EXIT
log "step 3/3: docker build -f deploy/Dockerfile.prebuilt --build-arg RUNTIME_BASE=$runtime_base -t $image"
for bin in tether-head tether-worker tetherctl; do
    cp "$binaries/$bin" "$context/"
done
cp scripts/docker-entrypoint.sh "$context/"
docker build --quiet -f deploy/Dockerfile.prebuilt --build-arg "RUNTIME_BASE=$runtime_base" \
    -t "$image" "$context" >/dev/null
done_in
