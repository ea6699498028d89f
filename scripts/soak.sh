#!/usr/bin/env bash
# The long soaks of docs/reliability.md (the normal test run, scripts/test.sh, keeps the fast
# cases): 1,000 clients x 1,000 checksummed messages, 10,000 idle connections, 20,000
# connection cycles, then each cargo fuzz target for FUZZ_SECONDS (default 120). About 10
# minutes on a 2-core machine. Installs what it needs: socketcomm and its test tools, uvloop,
# and cargo-fuzz (the fuzz runs need a nightly toolchain; they are skipped without one).
set -euo pipefail
cd "$(dirname "$0")/.."
FUZZ_SECONDS="${FUZZ_SECONDS:-120}"

step() { printf '\n== %s\n' "$*"; }

step "install socketcomm and the test tools"
python -m pip install --quiet --disable-pip-version-check ".[test]"

step "soaks"
python benches/soak.py all

step "fuzzing, ${FUZZ_SECONDS} s per target"
if ! rustup toolchain list | grep -q nightly; then
    echo "no nightly toolchain: skipping cargo fuzz (rustup toolchain install nightly)"
    exit 0
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
for target in decoder hello file_header; do
    (cd fuzz && cargo +nightly fuzz run "$target" -- -max_total_time="$FUZZ_SECONDS" -rss_limit_mb=2048 2>&1 |
        grep -E "^Done|DONE|ERROR|panicked" || true)
done
