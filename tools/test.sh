#!/usr/bin/env bash
# The whole test suite: installs what the tests need, then format, lint and tests.
# Used by .ci/run; safe to run beside a running gannetd (tests use ephemeral ports and
# their own temporary directories).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

# A clean clone builds once: incremental state would only take gigabytes of disk.
if [ -n "${CI:-}" ]; then export CARGO_INCREMENTAL=0; fi

step "test peers"
tools/install-peers.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "layers: the engine's modules import only downward (tools/layers.txt)"
python3 tools/layers.py --self-test
python3 tools/layers.py

step "cargo clippy --all-targets -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo test"
cargo test --workspace

step "benchmark smoke run (keeps bench/ working; figures are not recorded)"
cargo run --quiet -p gannet-bench --bin spool-bench -- \
  --seconds 0.2 --appenders 1,8 --shards 2 --recovery-records 2000 --raw-bytes 16777216 \
  --dir "${TMPDIR:-/tmp}/gannet-bench-smoke.$$" --results "" >/dev/null
cargo run --quiet -p gannet-bench --bin hop-bench -- --round-trips 200 --parts 5000 --results "" >/dev/null
cargo run --quiet -p gannet-bench --bin smtp-accept-bench -- \
  --messages 300 --sessions 8 --systems sink,gannet --half-load-messages 100 \
  --gannetd target/debug/gannetd --dir "${TMPDIR:-/tmp}/gannet-smtp-smoke.$$" --results "" >/dev/null

cargo run --quiet -p gannet-bench --bin relay-bench -- \
  --messages 300 --sessions 8 --domains 4 --systems pipe,gannet,gannet-listing,gannet-tls,gannet-mta-sts \
  --gannet-shards 0 --queued-messages 200 --timeout-secs 120 \
  --gannetd target/debug/gannetd --sink target/debug/gannet-sink --dir "${TMPDIR:-/tmp}/gannet-relay-smoke.$$" --results "" >/dev/null

# The capacity planner's validation: calibrate, plan, and one short point of load.
cargo run --quiet -p gannet-bench --bin plan-bench -- \
  --workloads smtp-4k,smtp-16k-slow-disk --loads 1.0 --seconds 1 --calibrate-messages 100 \
  --gannetd target/debug/gannetd --plan target/debug/gannet-plan \
  --blast target/debug/gannet-blast --sink target/debug/gannet-sink \
  --dir "${TMPDIR:-/tmp}/gannet-plan-smoke.$$" --results "" --charts "" >/dev/null

echo "all checks passed"
