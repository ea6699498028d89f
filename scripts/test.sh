#!/usr/bin/env bash
# Builds socketcomm's wheel once, installs it and its test tools into the active Python
# environment, then runs every check and test: formatting, lints, the Rust tests, the type-stub
# check and the pytest suite; then the pytest suite again on every other Python version the
# package claims (its classifiers), each in a virtual environment of its own with the same wheel.
# CI (.ci/run) runs exactly this; there a claimed version that is not installed is an error.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }
pip_quiet() { "$1" -m pip install --quiet --disable-pip-version-check "${@:2}"; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

step "build the wheel (abi3: one build for every supported Python)"
python -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$work/wheels" .
wheel="$(ls "$work"/wheels/socketcomm-*.whl)"

step "system packages the tests use: redis-server (the backplane's tests start their own)"
if ! command -v redis-server >/dev/null; then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -qq redis-server >/dev/null 2>&1 \
            || { apt-get update -qq >/dev/null && apt-get install -y -qq redis-server >/dev/null; }
    else
        echo "redis-server is missing, and installing it needs root and apt-get: the tests" \
             "that use it will be skipped, each saying so (under CI they fail instead)"
    fi
fi
command -v redis-server >/dev/null && redis-server --version

step "install socketcomm and the test tools"
pip_quiet python "socketcomm[test] @ file://$wheel"
# The same version may be installed already (an earlier build): this wheel replaces it.
pip_quiet python --force-reinstall --no-deps "$wheel"

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
# The bindings' own unit tests (src/python) link libpython, which the test binary finds here.
libdir="$(python -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')"
LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" cargo test --quiet --features python --lib

step "type stub against the installed module"
python -m mypy.stubtest socketcomm._socketcomm

active="$(python -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
step "Python tests on Python $active"
python -m pytest

# The claimed versions, from the classifiers in pyproject.toml.
claimed="$(python - <<'EOF'
import tomllib

with open("pyproject.toml", "rb") as f:
    classifiers = tomllib.load(f)["project"]["classifiers"]
prefix = "Programming Language :: Python :: 3."
print(" ".join("3." + c[len(prefix):] for c in classifiers if c.startswith(prefix)))
EOF
)"

# An interpreter of version $1: pyenv's newest of that series, else python3.X on the PATH.
interpreter() {
    local found=""
    if command -v pyenv >/dev/null; then
        for candidate in "$(pyenv root)/versions/$1".*/bin/python; do
            [[ -x "$candidate" ]] && found="$candidate"
        done
    fi
    if [[ -z "$found" ]] && command -v "python$1" >/dev/null; then
        found="$(command -v "python$1")"
    fi
    printf '%s' "$found"
}

for version in $claimed; do
    [[ "$version" == "$active" ]] && continue
    python_bin="$(interpreter "$version")"
    if [[ -z "$python_bin" ]]; then
        reason="Python $version is claimed but not installed here (pyenv install $version)"
        if [[ "${CI:-}" == "true" ]]; then
            echo "error: $reason" >&2
            exit 1
        fi
        step "SKIPPED the Python tests on Python $version: $reason"
        continue
    fi
    step "Python tests on Python $version ($python_bin), in a virtual environment"
    "$python_bin" -m venv "$work/venv-$version"
    pip_quiet "$work/venv-$version/bin/python" "socketcomm[test] @ file://$wheel"
    "$work/venv-$version/bin/python" -m pytest -p no:cacheprovider
done
