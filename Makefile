# The one place dev commands live. Everything runs in the project's own virtualenv (.venv),
# which the first target that needs it creates; only Rust (cargo) and Python 3.9+ must exist.

PYTHON ?= python3
VENV := .venv
PY := $(abspath $(VENV))/bin/python
# maturin develop installs into the active virtualenv; pyo3's build uses the same interpreter.
export VIRTUAL_ENV := $(abspath $(VENV))
export PYO3_PYTHON := $(PY)

.PHONY: all venv build demo test cargo-test pytest lint bench soak wheel sdist test-pythons clean haproxy

all: build

# What the test suite needs beside framesock itself (also installed by `make test-pythons`).
TEST_DEPS := "pytest>=8" "pytest-timeout>=2.3" "pytest-asyncio>=0.24" "hypothesis>=6.100" trustme uvloop prometheus_client
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

$(VENV)/.deps: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) "maturin>=1.9,<2" $(TEST_DEPS)
	touch $@

venv: $(VENV)/.deps

build: venv
	$(VENV)/bin/maturin develop --release --quiet

# Starts the server in the background, then the client (retrying until the server listens);
# the client's line is held back until the server has printed its own, so they read in order.
demo: build
	@$(VENV)/bin/framesock-server & server=$$!; \
	for attempt in $$(seq 100); do \
		reply=$$($(VENV)/bin/framesock-client 2>/dev/null) && break; sleep 0.1; \
	done; \
	wait $$server && echo "$$reply"

# The engine alone (no `python` feature): no Python is built, linked or loaded.
cargo-test:
	cargo test --quiet

pytest: build haproxy
	$(PY) -m pytest -q

# HAProxy, for tests/test_balancer.py: installed with apt-get where it is missing and this is
# root on Debian or Ubuntu; elsewhere the test is skipped and says why.
haproxy:
	@command -v haproxy >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null; \
		else echo "haproxy: not installed and cannot install it here (tests/test_balancer.py will be skipped)"; fi; }

test: cargo-test pytest

lint: build
	cargo fmt --check
	cargo clippy --all-targets --quiet -- -D warnings
	cargo clippy --all-targets --quiet --features python -- -D warnings
	$(PIP) "mypy>=1.15" "pyright>=1.1.400"
	$(PY) -m mypy.stubtest framesock._framesock
	# Strict, over the package and tests/typed_example.py (pyproject.toml says which files).
	$(PY) -m mypy
	$(VENV)/bin/pyright --pythonpath $(PY)

# Not part of `make test`: a benchmark prints numbers, it does not pass or fail.
# The interpreters the coroutine-handler rows run on: this virtualenv's, and Python 3.12 from
# `make test-pythons` when it has made that virtualenv (it has uvloop).
BENCH_PYTHON ?= $(PY) $(wildcard $(abspath .venv-pythons/3.12/bin/python))

bench: build
	$(PY) -m pip install --quiet --disable-pip-version-check uvloop orjson jiter pyzmq matplotlib
	cargo build --release --quiet --manifest-path bench/native/Cargo.toml
	BENCH_PYTHON="$(BENCH_PYTHON)" $(PY) bench/run.py

# Not part of `make test` either: minutes of good and hostile clients against one server
# (SOAK_SECONDS, default 300; SOAK_GOOD, SOAK_HOSTILE connections, default 300 each).
soak: build
	$(PY) -m pip install --quiet --disable-pip-version-check matplotlib
	$(PY) bench/soak.py

# A wheel for every Linux with glibc 2.17 or newer (manylinux2014): zig links against glibc
# 2.17's symbols, and auditwheel then checks that nothing newer slipped in.
ARCH := $(shell uname -m)
wheel: venv
	$(PIP) "ziglang>=0.13" "auditwheel>=6"
	rm -f dist/framesock-*.whl
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/maturin build --release --strip --zig \
		--compatibility manylinux2014 --interpreter $(PY) --out dist --quiet
	$(VENV)/bin/auditwheel show dist/framesock-*.whl | tr -s ' \n' ' ' \
		| grep -q 'consistent with the following platform tag: "manylinux_2_17_$(ARCH)"' \
		|| { $(VENV)/bin/auditwheel show dist/framesock-*.whl; echo "wheel: not manylinux_2_17"; exit 1; }
	@ls -l dist/framesock-*.whl

# The source distribution: builds and installs wherever cargo and a C compiler are present.
sdist: venv
	rm -f dist/framesock-*.tar.gz
	$(VENV)/bin/maturin sdist --out dist
	@tar tzf dist/framesock-*.tar.gz | grep -q '/LICENSE$$' || { echo "sdist: no LICENSE"; exit 1; }

# The whole suite against the wheel, on every CPython from 3.9 found here, each in a fresh
# virtualenv (TEST_PYTHONS=oldest,newest for just those two).
test-pythons: wheel
	$(PY) .ci/test-pythons dist/framesock-*.whl --only "$(TEST_PYTHONS)" -- $(TEST_DEPS)

clean:
	rm -rf $(VENV) .venv-pythons target bench/native/target dist
