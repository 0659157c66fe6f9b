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

# ---- Python -----------------------------------------------------------------
probe='import grpc, grpc_tools, google.protobuf'
if ! command -v python3 >/dev/null 2>&1; then
    apt_install python3 python3-venv
fi
if PATH="$venv/bin:$PATH" python3 -c "$probe" >/dev/null 2>&1; then
    echo "python: $(PATH="$venv/bin:$PATH" python3 -c 'import sys, grpc; print(sys.executable, "grpcio", grpc.__version__)')"
    exit 0
fi
if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
    # Debian's python3 ships venv and ensurepip separately.
    apt_install python3-venv
fi
echo "python: installing $requirements into $venv..."
python3 -m venv "$venv"
"$venv/bin/python3" -m pip install --quiet --disable-pip-version-check -r "$requirements"
"$venv/bin/python3" -c "$probe"
echo "python: $venv/bin/python3 ($("$venv/bin/python3" -c 'import grpc; print("grpcio", grpc.__version__)'))"
