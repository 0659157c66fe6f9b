# Tether's everyday commands. `make help` lists them.
#
# The demo and the tests start their own throwaway redis-server on a free
# port; `scripts/ensure-redis.sh` installs it first when it is missing.
# `make test` also provisions the rest of what the suite needs
# (`scripts/ensure-test-deps.sh`): Python packages in a virtualenv under
# target/, and debootstrap when a Docker engine answers.

CARGO       ?= cargo
# Extra flags for every cargo call, e.g. `make test CARGO_FLAGS=--locked`.
CARGO_FLAGS ?=
# Extra arguments for the test binaries, e.g. `make test TEST_ARGS=failover`.
TEST_ARGS   ?=
# Extra flags for every head of the demo, e.g.
# `make demo DEMO_ARGS="--heartbeat-interval 200ms --heartbeat-timeout 600ms"`.
DEMO_ARGS   ?=
IMAGE       ?= tether:dev
# The Dockerfile's images. When one cannot be pulled, `make image` builds
# from host binaries on tether-base:bookworm (make container-base) instead.
RUST_IMAGE  ?= rust:1-bookworm
RUNTIME_BASE ?= debian:bookworm-slim
# How many workers `make compose-up` starts.
WORKERS     ?= 12
# How many fresh seeds `make chaos` plays (tests/chaos_processes.rs);
# `make test` plays one, plus the schedule of issue 16.
SEEDS       ?= 5
# Where `make test` keeps the Python packages of tests/python_client.rs.
export TETHER_PYTHON_VENV ?= target/python-venv

.DEFAULT_GOAL := help
.PHONY: help redis test-deps build release demo test chaos bench lint fmt image image-prebuilt container-base compose-up compose-down test-containers clean

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-16s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

redis: ## Make sure redis-server is installed (apt-get when missing)
	@scripts/ensure-redis.sh

test-deps: ## Install what the test suite needs (Redis, Python packages, ...)
	@scripts/ensure-test-deps.sh

build: ## Build everything (debug): the tether package, the test kit, the bench
	$(CARGO) build $(CARGO_FLAGS) --workspace --all-targets

release: ## Build every binary (release)
	$(CARGO) build $(CARGO_FLAGS) --release --bins

demo: redis ## 3 heads, 12 workers: SIGKILL one head (failover times), SIGTERM another (drain)
	$(CARGO) build $(CARGO_FLAGS) --release --bin tether-head --bin tether-worker --bin tetherctl --example demo
	target/release/examples/demo $(DEMO_ARGS)

test: test-deps ## Run the whole test suite (each test starts its own Redis)
	PATH="$(abspath $(TETHER_PYTHON_VENV))/bin:$$PATH" $(CARGO) test $(CARGO_FLAGS) --no-fail-fast -- $(TEST_ARGS)

chaos: redis ## Chaos with 200 tether-worker processes over SEEDS fresh seeds (about 1.5 min each)
	TETHER_CHAOS_SEEDS=$(SEEDS) $(CARGO) test $(CARGO_FLAGS) --test chaos_processes -- --nocapture seeded_schedules $(TEST_ARGS)

bench: redis ## Every tether-bench scenario at full size (about 15 min); JSON and SVG charts in target/bench/
	$(CARGO) build $(CARGO_FLAGS) --release -p tether --bin tether-head --bin tether-worker -p tether-bench --bin tether-bench
	@mkdir -p target/bench
	@for s in failover hang drain scale-up steady capacity; do \
		target/release/tether-bench $$s --json target/bench/$$s.json || exit 1; \
	done

lint: ## rustfmt check, clippy with warnings as errors, shellcheck
	$(CARGO) fmt --all --check
	$(CARGO) clippy $(CARGO_FLAGS) --workspace --all-targets -- -D warnings
	@if command -v shellcheck >/dev/null 2>&1; then \
		shellcheck scripts/*.sh .ci/run; \
	else \
		echo "shellcheck not installed; skipping the shell scripts (apt-get install shellcheck)"; \
	fi

fmt: ## Format the Rust sources
	$(CARGO) fmt --all

# Both image targets run scripts/build-image.sh, which names each step.
# IMAGE_BINARIES=DIR takes the three binaries from DIR instead of building
# them (the registry-free path only).
IMAGE_BINARIES ?=
IMAGE_ENV = IMAGE='$(IMAGE)' RUST_IMAGE='$(RUST_IMAGE)' RUNTIME_BASE='$(RUNTIME_BASE)' \
	CARGO='$(CARGO)' CARGO_FLAGS='$(CARGO_FLAGS)' TETHER_IMAGE_BINARIES='$(IMAGE_BINARIES)'

image: ## Build the image tether:dev (IMAGE=...); without a registry, from host binaries on a local base
	@$(IMAGE_ENV) scripts/build-image.sh

image-prebuilt: ## The image from host-built release binaries (RUNTIME_BASE=...; local base if unpullable)
	@$(IMAGE_ENV) scripts/build-image.sh --prebuilt

container-base: ## Build tether-base:bookworm with debootstrap (root; no registry needed)
	scripts/container-base.sh

compose-up: ## Redis, two heads and WORKERS workers in Compose (scripts/compose.sh; no registry needed)
	scripts/compose.sh up -d --scale worker=$(WORKERS)

compose-down: ## Stop and remove the Compose cluster
	scripts/compose.sh down

test-containers: test-deps ## Only the container and manifest tests (fail without Docker)
	TETHER_REQUIRE_DOCKER=1 $(CARGO) test $(CARGO_FLAGS) --test containers --test deploy_manifests -- $(TEST_ARGS)

clean: ## Remove build output
	$(CARGO) clean
