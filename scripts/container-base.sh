#!/usr/bin/env bash
# Builds the runtime base image of the container tests without pulling
# anything: a minimal Debian bookworm root file system made by debootstrap
# from this machine's own Debian mirror, with `redis-server` and
# `ca-certificates` inside, imported into Docker with `docker import`.
#
# Why: the machines that run the container tests reach Debian's mirror but
# no image registry, so `FROM debian:bookworm-slim` and `image: redis:7`
# cannot be pulled there. This image stands in for both: the runtime stage
# uses it through `--build-arg RUNTIME_BASE=...`, and docker-compose.yml
# runs Redis from it through TETHER_REDIS_IMAGE (docs/containers.md).
#
# Usage: scripts/container-base.sh [--tag IMAGE] [--force]
#   --tag IMAGE  the tag to import under (default: $TETHER_BASE_IMAGE, or
#                tether-base:bookworm)
#   --force      rebuild even if IMAGE already exists
# Environment: MIRROR overrides the Debian mirror read from
#   /etc/apt/sources.list*; SUITE overrides bookworm.
#
# Needs root (debootstrap) and the debootstrap package
# (`apt-get install -y debootstrap`). Takes about a minute; a second run
# finds the image and returns at once.
set -euo pipefail

tag=${TETHER_BASE_IMAGE:-tether-base:bookworm}
force=
while [ $# -gt 0 ]; do
    case $1 in
        --tag)
            tag=${2:?--tag needs an image name}
            shift 2
            ;;
        --force)
            force=1
            shift
            ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "container-base.sh: unknown argument '$1' (try --help)" >&2
            exit 2
            ;;
    esac
done
suite=${SUITE:-bookworm}

log() { echo "container-base: $*" >&2; }

if ! docker version >/dev/null 2>&1; then
    log "no Docker engine answers (docker version failed)"
    exit 1
fi

# Several test processes may ask for the image at once: one builds, the
# others wait here and then find it.
# (A read-only descriptor is enough for flock, so root and other users can
# share one lock file.)
lock=${TMPDIR:-/tmp}/tether-container-base.lock
if [ ! -e "$lock" ]; then
    : >"$lock"
    chmod 0666 "$lock" 2>/dev/null || true
fi
exec 9<"$lock"
flock 9

if [ -z "$force" ] && docker image inspect "$tag" >/dev/null 2>&1; then
    log "$tag already exists; nothing to do (--force rebuilds it)"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    log "debootstrap needs root: run it as root or with sudo"
    exit 1
fi
if ! command -v debootstrap >/dev/null 2>&1; then
    log "debootstrap is not installed: apt-get install -y debootstrap"
    exit 1
fi

# The first Debian mirror this machine's apt uses for the main archive
# (not security), from one-line or deb822 sources.
find_mirror() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        awk '$1 == "deb" {
                for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i !~ /\]$/) break;
                if ($i ~ /debian\/?$/ && $i !~ /security/) { print $i; exit }
            }' "$f"
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk 'tolower($1) == "uris:" {
                for (i = 2; i <= NF; i++)
                    if ($i ~ /debian\/?$/ && $i !~ /security/) { print $i; exit }
            }' "$f"
    done
}
mirror=${MIRROR:-$(find_mirror | head -n 1)}
mirror=${mirror:-http://deb.debian.org/debian}

started=$SECONDS
work=$(mktemp -d "${TMPDIR:-/var/tmp}/tether-base.XXXXXX")
cleanup() { rm -rf "$work"; }
trap cleanup EXIT
rootfs=$work/rootfs

log "debootstrap --variant=minbase $suite from $mirror (includes redis-server, ca-certificates)"
if ! debootstrap --variant=minbase --include=redis-server,ca-certificates \
    "$suite" "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1; then
    tail -n 30 "$work/debootstrap.log" >&2
    log "debootstrap failed (log above)"
    exit 1
fi

# Nothing the image needs at run time: package caches, lists, docs.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
    "$rootfs"/var/log/*.log "$rootfs"/var/cache/debconf/*-old
# Containers get their resolver and hosts file from the engine.
: >"$rootfs/etc/resolv.conf"
: >"$rootfs/etc/hostname"

log "docker import as $tag"
tar --numeric-owner -C "$rootfs" -c . |
    docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' \
        --message "debootstrap --variant=minbase $suite from $mirror, with redis-server and ca-certificates" \
        - "$tag" >/dev/null

size=$(docker image inspect --format '{{.Size}}' "$tag")
log "built $tag ($((size / 1024 / 1024)) MiB) in $((SECONDS - started))s"
