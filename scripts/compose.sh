#!/usr/bin/env bash
# Docker Compose for docker-compose.yml, whichever Compose this machine has,
# and working where no image registry is reachable:
#
#   scripts/compose.sh up -d --scale worker=20
#   scripts/compose.sh exec head-2 tetherctl status --brief
#   scripts/compose.sh stop head-1
#   scripts/compose.sh logs head-1
#   scripts/compose.sh down
#
# Every argument goes to Compose unchanged, except that:
# - it runs `docker compose` (v2 plugin) when that works, else
#   `docker-compose` (v1), and says how to install one when neither does;
# - without -f/--file (and COMPOSE_FILE) it uses the repository's
#   docker-compose.yml, and COMPOSE_PROJECT_NAME defaults to `tether`, so
#   it works from any directory and the names are tether_registry,
#   tether_head-1_1 (v1) or tether-head-1-1 (v2);
# - on `up`, `create`, `run` and `config`, when TETHER_REDIS_IMAGE is unset
#   and redis:7-bookworm is neither here nor pullable, Redis runs from
#   tether-base:bookworm (scripts/container-base.sh; it has redis-server);
# - on `up`, `create` and `run`, when the Tether image (TETHER_IMAGE,
#   default tether:dev) does not exist, it is built first with
#   scripts/build-image.sh (`make image`), since Compose's own `build: .`
#   needs a registry;
# - `exec` without a terminal on stdin gets -T (v1 would fail otherwise).
#
# Environment: TETHER_IMAGE, TETHER_REDIS_IMAGE (as in docker-compose.yml),
# TETHER_BASE_IMAGE (tether-base:bookworm), PULL_CHECK_TIMEOUT (20 s).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
local_base=${TETHER_BASE_IMAGE:-tether-base:bookworm}
pull_timeout=${PULL_CHECK_TIMEOUT:-20}

log() { echo "compose: $*" >&2; }

if docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
    compose=(docker-compose)
else
    log "neither \`docker compose\` nor \`docker-compose\` is installed;"
    log "install one, e.g. sudo apt-get install -y docker-compose (or the docker-compose-plugin package)"
    exit 1
fi

# The subcommand: the first argument that is neither a global option nor
# the value of one.
args=("$@")
has_file=${COMPOSE_FILE:+1}
sub=
sub_at=
i=0
while [ "$i" -lt "${#args[@]}" ]; do
    case ${args[$i]} in
        -f | --file) has_file=1; i=$((i + 2)) ;;
        --file=*) has_file=1; i=$((i + 1)) ;;
        -p | --project-name | --env-file | --profile | --project-directory | -c | --context | \
            -H | --host | --ansi | --log-level | --progress | --parallel)
            i=$((i + 2))
            ;;
        -*) i=$((i + 1)) ;;
        *)
            sub=${args[$i]}
            sub_at=$i
            break
            ;;
    esac
done

# Whether an image is here or can be pulled (a registry that does not
# answer within the timeout counts as none).
available() {
    docker image inspect "$1" >/dev/null 2>&1 ||
        timeout "$pull_timeout" docker manifest inspect "$1" >/dev/null 2>&1
}

case $sub in
    up | create | run | config)
        if [ -z "${TETHER_REDIS_IMAGE:-}" ] && ! available redis:7-bookworm; then
            if ! docker image inspect "$local_base" >/dev/null 2>&1; then
                log "redis:7-bookworm cannot be pulled and $local_base does not exist; building it"
                "$repo/scripts/container-base.sh" --tag "$local_base" || {
                    log "run: sudo apt-get install -y debootstrap && sudo scripts/container-base.sh"
                    exit 1
                }
            fi
            log "redis:7-bookworm cannot be pulled; Redis runs from $local_base (TETHER_REDIS_IMAGE=$local_base)"
            export TETHER_REDIS_IMAGE=$local_base
        fi
        ;;
esac
case $sub in
    up | create | run)
        tether_image=${TETHER_IMAGE:-tether:dev}
        if ! docker image inspect "$tether_image" >/dev/null 2>&1 &&
            ! printf '%s\n' "$@" | grep -qx -- '--build'; then
            log "$tether_image does not exist; building it first: scripts/build-image.sh --tag $tether_image (make image)"
            "$repo/scripts/build-image.sh" --tag "$tether_image"
        fi
        ;;
    exec)
        if [ ! -t 0 ] && ! printf '%s\n' "$@" | grep -qxE -- '-T|--no-TTY|--no-tty'; then
            args=("${args[@]:0:sub_at+1}" -T "${args[@]:sub_at+1}")
        fi
        ;;
esac

files=()
if [ -z "$has_file" ]; then
    files=(-f "$repo/docker-compose.yml")
fi
export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-tether}
exec "${compose[@]}" ${files[@]+"${files[@]}"} ${args[@]+"${args[@]}"}
