# Tether's everyday commands. `make help` lists them.
#
# The demo and the tests start their own throwaway redis-server on a free
# port; `scripts/ensure-redis.sh` installs it first when it is missing.

CARGO       ?= cargo
# Extra flags for every cargo call, e.g. `make test CARGO_FLAGS=--locked`.
CARGO_FLAGS ?=
# Extra arguments for the test binaries, e.g. `make test TEST_ARGS=failover`.
TEST_ARGS   ?=
# Extra flags for every head of the demo, e.g.
# `make demo DEMO_ARGS="--heartbeat-interval 200ms --heartbeat-timeout 600ms"`.
DEMO_ARGS   ?=
IMAGE       ?= tether:dev

.DEFAULT_GOAL := help
.PHONY: help redis build release demo test lint fmt image clean

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-8s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

redis: ## Make sure redis-server is installed (apt-get when missing)
	@scripts/ensure-redis.sh

build: ## Build everything (debug)
	$(CARGO) build $(CARGO_FLAGS) --all-targets

release: ## Build tether-head and tether-worker (release)
	$(CARGO) build $(CARGO_FLAGS) --release --bins

demo: redis ## 3 heads, 12 workers, SIGKILL one head, time the failover
	$(CARGO) build $(CARGO_FLAGS) --release --bins --example demo
	target/release/examples/demo $(DEMO_ARGS)

test: redis ## Run the whole test suite against a throwaway Redis
	$(CARGO) test $(CARGO_FLAGS) -- $(TEST_ARGS)

lint: ## rustfmt check, clippy with warnings as errors, shellcheck
	$(CARGO) fmt --all --check
	$(CARGO) clippy $(CARGO_FLAGS) --all-targets -- -D warnings
	@if command -v shellcheck >/dev/null 2>&1; then \
		shellcheck scripts/*.sh .ci/run; \
	else \
		echo "shellcheck not installed; skipping the shell scripts (apt-get install shellcheck)"; \
	fi

fmt: ## Format the Rust sources
	$(CARGO) fmt --all

image: ## Build the container image with both binaries (IMAGE=tether:dev)
	docker build -t $(IMAGE) .

clean: ## Remove build output
	$(CARGO) clean
