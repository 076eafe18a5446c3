#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser that reads input from outside (the SMTP
# command arguments and DATA reader, remote SMTP replies, the template language, the
# HTML rewriting for tracking, the JSON API bodies, the config parser, spool recovery
# from arbitrary bytes) with libFuzzer through cargo-fuzz. Installs cargo-fuzz when
# missing (it needs the nightly toolchain), runs each target for SECONDS (default 60)
# from the corpus kept in bench/fuzz/corpus/ (new inputs go to a scratch directory,
# not the repository), and appends a table to bench/RESULTS.md. A crash stops the
# run with the input that caused it: copy it to bench/fuzz/regressions/<target>/ (the
# test command replays that directory), fix the code, and run again.
#
#   bench/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(smtp_command smtp_data smtp_reply template html_tracking json_api config spool_recovery)
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
rustup toolchain list | grep -q '^nightly' || {
  echo "bench/fuzz.sh needs the nightly toolchain (rustup toolchain install nightly)" >&2
  exit 2
}
scratch=$(mktemp -d "${TMPDIR:-/tmp}/gannet-fuzz.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
(cd bench/fuzz && cargo +nightly fuzz build -O >/dev/null)
revision=$(git rev-parse --short HEAD)
rows=()
for target in "${targets[@]}"; do
  mkdir -p "$scratch/$target" "$scratch/artifacts/$target"
  log="$scratch/$target.log"
  echo "fuzzing $target for ${seconds}s"
  status=0
  (cd bench/fuzz && cargo +nightly fuzz run -O "$target" "$scratch/$target" "corpus/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
    -artifact_prefix="$scratch/artifacts/$target/" >"$log" 2>&1) || status=$?
  done_line=$(grep -aE '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1 || true)
  runs=$(echo "$done_line" | sed -E 's/^#([0-9]+).*/\1/')
  cov=$(echo "$done_line" | sed -nE 's/.*cov: ([0-9]+).*/\1/p')
  rate=$(echo "$done_line" | sed -nE 's/.*exec\/s: ([0-9]+).*/\1/p')
  corpus=$(find "$scratch/$target" -type f | wc -l)
  if [ "$status" -ne 0 ]; then
    crash=$(ls "$scratch/artifacts/$target/" | head -1)
    mkdir -p "bench/fuzz/regressions/$target"
    cp "$scratch/artifacts/$target/$crash" "bench/fuzz/regressions/$target/"
    tail -40 "$log" >&2
    echo "$target: crash kept as bench/fuzz/regressions/$target/$crash" >&2
    rows+=("| $target | crash: \`regressions/$target/$crash\` | | | |")
    continue
  fi
  rows+=("| $target | ${runs:-?} | ${rate:-?} | ${cov:-?} | $corpus |")
done
{
  echo
  echo "## Fuzzing at $revision ($(date -u +%Y-%m-%d))"
  echo
  echo "Command: \`bench/fuzz.sh $seconds\` — libFuzzer (cargo-fuzz $(cargo fuzz --version 2>/dev/null | awk '{print $2}'), $(rustc +nightly --version | awk '{print $2}')),"
  echo "${seconds} s per target from the kept corpus. Machine: $(nproc) cores, $(uname -r)."
  echo
  echo "| target | runs | runs/s | coverage (edges) | corpus after |"
  echo "|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
} >>bench/RESULTS.md
printf '%s\n' "${rows[@]}"
if printf '%s\n' "${rows[@]}" | grep -q crash; then exit 1; fi
