#!/bin/sh
# The container image's entry point: the first argument picks the binary
# (`head` or `worker`, or `tether-head` / `tether-worker`), the rest are its
# flags. Anything else runs as given, e.g. `docker run IMAGE sh`.
set -eu
case "${1:-}" in
    head | tether-head)
        shift
        exec tether-head "$@"
        ;;
    worker | tether-worker)
        shift
        exec tether-worker "$@"
        ;;
    "" | -*)
        echo "usage: docker run IMAGE head|worker [FLAGS...]   (try: head --help)" >&2
        exit 2
        ;;
    *)
        exec "$@"
        ;;
esac
