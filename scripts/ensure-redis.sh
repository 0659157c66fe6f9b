#!/usr/bin/env bash
# Makes sure `redis-server` is on PATH, because the demo and the tests start
# their own throwaway Redis on a free port (they never use a system one).
#
# - Already there: prints its version and exits 0.
# - Missing, Debian/Ubuntu: installs the `redis-server` package with apt-get
#   (directly as root, through `sudo -n` otherwise).
# - Missing and no way to install it here: prints the exact command to run
#   and exits 1.
#
# Installing the package may also start Debian's own redis service on port
# 6379; Tether's demo and tests do not use it.
set -euo pipefail

PACKAGE=redis-server

have_redis() {
    command -v redis-server >/dev/null 2>&1
}

report() {
    echo "redis-server: $(command -v redis-server) ($(redis-server --version | head -n 1))"
}

if have_redis; then
    report
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: redis-server is not on PATH and this system has no apt-get." >&2
    echo "Install Redis with your package manager, for example:" >&2
    echo "    sudo dnf install redis        # Fedora" >&2
    echo "    brew install redis            # macOS" >&2
    echo "then run this again." >&2
    exit 1
fi

if [ "$(id -u)" -eq 0 ]; then
    sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo=(sudo -n)
else
    echo "error: redis-server is not on PATH, and installing it needs root." >&2
    echo "Run this, then try again:" >&2
    echo "    sudo apt-get update && sudo apt-get install -y $PACKAGE" >&2
    exit 1
fi

echo "redis-server is missing; installing the '$PACKAGE' package with apt-get..."
export DEBIAN_FRONTEND=noninteractive
${sudo[@]+"${sudo[@]}"} apt-get update -qq
${sudo[@]+"${sudo[@]}"} apt-get install -y -qq --no-install-recommends "$PACKAGE" >/dev/null

if ! have_redis; then
    echo "error: installed '$PACKAGE' but redis-server is still not on PATH." >&2
    exit 1
fi
report
