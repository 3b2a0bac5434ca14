# envoyx developer targets. `make help` lists them.
PYTHON ?= python3
GO ?= $(shell command -v go || echo /usr/local/go/bin/go)
export CARGO_TARGET_DIR ?= $(HOME)/.cache/envoyx/target

.PHONY: help install install-test install-iptables build-xds-go build-istio test test-rust test-python lint fmt bench run validate

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

install:  ## build the Rust core with maturin and install envoyx
	$(PYTHON) -m pip install --quiet .

install-test:  ## install envoyx and everything the tests need
	$(PYTHON) -m pip install --quiet ".[test]"
	$(MAKE) install-iptables
	$(MAKE) build-xds-go
	$(MAKE) build-istio

# tests/test_sidecar_redirect.py sets up a real iptables REDIRECT in a private network
# namespace; installed from Debian's packages when missing (the tests run as root).
install-iptables:  ## install iptables for the sidecar REDIRECT test
	command -v iptables >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iptables; }

# Built here rather than in the test fixture: a first build on a fresh or busy
# machine (module downloads, go-control-plane compiled) can take minutes.
build-xds-go:  ## build the go-control-plane test server into the cache
	cd tests/xds_go && GOFLAGS="-mod=mod -buildvcs=false" $(GO) build -o $(HOME)/.cache/envoyx/xds-go/xds-go .

# istiod's pilot-discovery from the Go module proxy, patched to run without Kubernetes,
# cached in ~/.cache/envoyx/istio/ by version and patch (tests/support/istio_build.py).
# A first build compiles about 1,800 packages: minutes, hence a step of its own.
build-istio:  ## build istiod's pilot-discovery for tests/test_istio.py into the cache
	$(PYTHON) tests/support/istio_build.py

test: install-test test-rust test-python  ## install test needs, run every test (Rust unit + pytest)

test-rust:  ## Rust unit tests of the core (no Python needed)
	cargo test --release -p envoyx-core --quiet

test-python:  ## pytest end-to-end, differential and config tests
	$(PYTHON) -m pytest -q

lint:  ## rustfmt, clippy -D warnings, ruff, mypy --strict, stubtest
	cargo fmt --all --check
	cargo clippy --release --workspace --all-targets -- -D warnings
	$(PYTHON) -m ruff check python tests benches examples
	$(PYTHON) -m ruff format --check python tests benches examples
	$(PYTHON) -m mypy
	$(PYTHON) -m mypy.stubtest envoyx._core

fmt:  ## format Rust and Python sources
	cargo fmt --all
	$(PYTHON) -m ruff format python tests benches examples

bench:  ## micro-benchmarks, the load harness, filter cost, xDS apply, instructions per request
	$(PYTHON) -m pytest benches -q --benchmark-enable
	$(PYTHON) benches/harness.py
	$(PYTHON) benches/tls.py
	$(PYTHON) benches/filters.py
	$(PYTHON) benches/xds_apply.py
	$(PYTHON) benches/instructions.py

run: install  ## run the shipped example
	envoyx -c examples/front-proxy.yaml
