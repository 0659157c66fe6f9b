#!/bin/bash
# Heartbeat cost of three servers at the same N, one after another: the
# raw-TCP floor (../shared/peers/raw-tcp-beats), a minimal tonic server
# and a server on the h2 crate directly. Each worker has its own TCP
# connection and one bidirectional stream, a message a second each way.
# Usage, from this folder after `cargo build --release` here and in
# raw-tcp-beats (see ../../../shared/peers/README.md):
#   ./run.sh N SECS
set -u
here=$(cd "$(dirname "$0")" && pwd)
N=${1:-10000}; S=${2:-20}
ulimit -n 20000 2>/dev/null
B=$here/target/release
P=${RAW_TCP_BEATS:-$here/../../../shared/peers/raw-tcp-beats/target/release/raw-tcp-beats}
# Below the ephemeral range, so that no client socket holds the port.
port=$((21000 + RANDOM % 2500 * 4))
$P server 127.0.0.1:$port & sp=$!; sleep 0.5
echo -n "floor  "; $P load 127.0.0.1:$port "$N" "$S" $sp; kill $sp; wait $sp 2>/dev/null
"$B/server_tonic" 127.0.0.1:$((port+1)) & sp=$!; sleep 0.5
echo -n "tonic  "; "$B/load" 127.0.0.1:$((port+1)) "$N" "$S" $sp; kill $sp; wait $sp 2>/dev/null
"$B/server_h2" 127.0.0.1:$((port+2)) & sp=$!; sleep 0.5
echo -n "h2     "; "$B/load" 127.0.0.1:$((port+2)) "$N" "$S" $sp; kill $sp; wait $sp 2>/dev/null
"$B/server_h2" 127.0.0.1:$((port+3)) --quiet-wakes & sp=$!; sleep 0.5
echo -n "h2q    "; "$B/load" 127.0.0.1:$((port+3)) "$N" "$S" $sp; kill $sp; wait $sp 2>/dev/null
