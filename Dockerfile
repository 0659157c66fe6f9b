# One image with all three binaries: tether-head, tether-worker, tetherctl.
#
#   docker build -t tether:dev .
#   docker run --rm tether:dev head   --redis-url redis://redis:6379 --advertise head-1:7070
#   docker run --rm tether:dev worker --redis-url redis://redis:6379 --advertise worker-1:7071
#   docker run --rm tether:dev tetherctl --redis-url redis://redis:6379 status
#
# The first argument picks the binary (`head`, `worker`, or any command such
# as `tetherctl`); the rest are its flags. Every flag also has a TETHER_*
# environment variable (docs/configuration.md). Both servers listen on
# 0.0.0.0 by default (head 7070, worker 7071); give each container an
# --advertise address that the others can reach.
#
# deploy/Dockerfile.prebuilt makes the same runtime image from binaries
# built on the host; docs/containers.md has both, Compose and Kubernetes.

# The images to build on and run on. Override them to use a mirror, or a
# locally built base where no registry is reachable
# (scripts/container-base.sh: --build-arg RUNTIME_BASE=tether-base:bookworm).
ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_BASE=debian:bookworm-slim

# ---- build ------------------------------------------------------------------
FROM ${RUST_IMAGE} AS builder
WORKDIR /src
# The binaries the image ships.
ARG BINS="tether-head tether-worker tetherctl"

# Dependencies first, in their own layer: it is rebuilt only when the
# manifests, the lock file, build.rs or the protocol change. Every target
# path named in a manifest (the root is also the workspace of
# crates/tether-testkit and crates/tether-bench, which the image does not
# ship but cargo must be able to read) gets a stub so that cargo accepts it.
COPY Cargo.toml Cargo.lock build.rs ./
COPY crates/tether-testkit/Cargo.toml ./crates/tether-testkit/
COPY crates/tether-bench/Cargo.toml ./crates/tether-bench/
COPY proto ./proto
# h2 with smaller per-connection buffers, put in place by the root
# manifest's [patch.crates-io] (vendor/h2/PATCHED.md).
COPY vendor ./vendor
RUN set -eu; \
    for manifest in Cargo.toml crates/*/Cargo.toml; do \
        dir=$(dirname "$manifest"); \
        for path in $(sed -n 's/^path *= *"\(.*\)"/\1/p' "$manifest"); do \
            mkdir -p "$dir/$(dirname "$path")"; \
            echo 'fn main() {}' > "$dir/$path"; \
        done; \
    done; \
    : > src/lib.rs; \
    mkdir -p crates/tether-testkit/src; \
    : > crates/tether-testkit/src/lib.rs; \
    cargo build --release --locked -p tether $(printf -- '--bin %s ' $BINS); \
    rm -rf src services

# The real sources. COPY keeps the files' modification times, which may be
# older than the stubs' build, so touch them or cargo keeps the stubs.
COPY src ./src
COPY services ./services
RUN set -eu; \
    find src services -name '*.rs' -exec touch {} +; \
    cargo build --release --locked -p tether $(printf -- '--bin %s ' $BINS); \
    mkdir -p /out; \
    for bin in $BINS; do cp "target/release/$bin" /out/; done

# ---- run --------------------------------------------------------------------
# Keep this stage's settings in step with deploy/Dockerfile.prebuilt
# (tests/deploy_manifests.rs compares them).
FROM ${RUNTIME_BASE} AS runtime

# ca-certificates for rediss:// and TLS to heads; skipped when the base has
# it already. The user has a fixed uid and gid so that Kubernetes'
# runAsUser/runAsGroup and volume permissions can name them.
RUN set -eu; \
    if ! dpkg -s ca-certificates >/dev/null 2>&1; then \
        apt-get update; \
        apt-get install -y --no-install-recommends ca-certificates; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    groupadd --system --gid 10001 tether; \
    useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin tether

COPY --from=builder /out/ /usr/local/bin/
COPY scripts/docker-entrypoint.sh /usr/local/bin/tether-entrypoint
RUN chmod 0755 /usr/local/bin/tether-entrypoint

USER 10001:10001
# 7070: tether-head (HeadService); 7071: tether-worker (WorkerService);
# 9090: Prometheus metrics when --metrics-listen is set. The gRPC ports also
# serve grpc.health.v1.Health and server reflection.
EXPOSE 7070 7071 9090
# Both binaries stop cleanly on SIGTERM (a head drains first). The entry
# point execs them, so they run as PID 1 and get the signal directly.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/tether-entrypoint"]
CMD ["head"]
