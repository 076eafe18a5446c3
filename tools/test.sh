#!/usr/bin/env bash
# The whole test suite: installs what the tests need, then format, lint and tests.
# Used by .ci/run; safe to run beside a running gannetd (tests use ephemeral ports and
# their own temporary directories).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

step "test peers"
# Real peers the tests talk to: swaks (with TLS support) and Python's smtplib as SMTP
# clients; postfix's smtp-sink/smtp-source; dnsmasq as the DNS server for MX tests.
# Installed only when missing.
need=()
command -v swaks >/dev/null || need+=(swaks)
perl -MIO::Socket::SSL -e1 2>/dev/null || need+=(libio-socket-ssl-perl libnet-ssleay-perl)
[ -x /usr/sbin/smtp-sink ] || need+=(postfix)
command -v dnsmasq >/dev/null || need+=(dnsmasq-base)
command -v python3 >/dev/null || need+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"; }
  install >/dev/null || { apt-get update -q >/dev/null && install >/dev/null; }
fi
# Python peers (aiosmtpd as an independent SMTP server) in a venv under target/.
if ! target/pyenv/bin/python3 -c 'import aiosmtpd' 2>/dev/null; then
  python3 -m venv target/pyenv
  target/pyenv/bin/pip install -q aiosmtpd==1.4.6
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo test"
cargo test --workspace

step "benchmark smoke run (keeps bench/ working; figures are not recorded)"
cargo run --quiet -p gannet-bench --bin spool-bench -- \
  --seconds 0.2 --appenders 1,8 --shards 2 --recovery-records 2000 \
  --dir "${TMPDIR:-/tmp}/gannet-bench-smoke.$$" --results "" >/dev/null
cargo run --quiet -p gannet-bench --bin hop-bench -- --round-trips 200 --parts 5000 --results "" >/dev/null
cargo run --quiet -p gannet-bench --bin smtp-accept-bench -- \
  --messages 300 --sessions 8 --systems sink,gannet --half-load-messages 100 \
  --gannetd target/debug/gannetd --dir "${TMPDIR:-/tmp}/gannet-smtp-smoke.$$" --results "" >/dev/null

echo "all checks passed"
