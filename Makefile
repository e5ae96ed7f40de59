# The one place dev commands live. Everything runs in the project's own virtualenv (.venv),
# which the first target that needs it creates; only Rust (cargo) and Python 3.9+ must exist.

PYTHON ?= python3
VENV := .venv
PY := $(abspath $(VENV))/bin/python
# maturin develop installs into the active virtualenv; pyo3's build uses the same interpreter.
export VIRTUAL_ENV := $(abspath $(VENV))
export PYO3_PYTHON := $(PY)

.PHONY: all venv build demo test cargo-test pytest lint bench soak clean

all: build

$(VENV)/.deps: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "maturin>=1.9,<2" "pytest>=8" "pytest-timeout>=2.3" "pytest-asyncio>=0.24" "hypothesis>=6.100" trustme uvloop
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

pytest: build
	$(PY) -m pytest -q

test: cargo-test pytest

lint: build
	cargo fmt --check
	cargo clippy --all-targets --quiet -- -D warnings
	cargo clippy --all-targets --quiet --features python -- -D warnings
	$(PY) -m pip install --quiet --disable-pip-version-check mypy
	$(PY) -m mypy.stubtest framesock._framesock

# Not part of `make test`: a benchmark prints numbers, it does not pass or fail.
bench: build
	$(PY) -m pip install --quiet --disable-pip-version-check uvloop orjson jiter pyzmq matplotlib
	cargo build --release --quiet --manifest-path bench/native/Cargo.toml
	$(PY) bench/run.py

# Not part of `make test` either: minutes of good and hostile clients against one server
# (SOAK_SECONDS, default 300; SOAK_GOOD, SOAK_HOSTILE connections, default 300 each).
soak: build
	$(PY) -m pip install --quiet --disable-pip-version-check matplotlib
	$(PY) bench/soak.py

clean:
	rm -rf $(VENV) target bench/native/target
