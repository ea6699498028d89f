#!/usr/bin/env bash
# Installs socketcomm and its test tools into the active Python environment, then runs every
# check and test: formatting, lints, the Rust tests, the type-stub check and the pytest suites.
# CI (.ci/run) runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

step "install socketcomm and the test tools"
python -m pip install --quiet --disable-pip-version-check ".[test]"

step "format and lint"
cargo fmt --all -- --check
cargo clippy --all-features --tests -- -D warnings
ruff check .
ruff format --check .
python -m mypy python/socketcomm examples tests_py benches

step "Rust tests"
cargo test --quiet
# A panic injected into one connection's task (the feature exists for this test only).
cargo test --quiet --features fault-injection --test faults

step "type stub against the installed module"
python -m mypy.stubtest socketcomm._socketcomm

step "Python tests"
python -m pytest
