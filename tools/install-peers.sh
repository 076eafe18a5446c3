#!/usr/bin/env bash
# Installs the real peers that tests and benchmarks talk to, when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
# Real peers the tests talk to: swaks (with TLS support) and Python's smtplib as SMTP
# clients; postfix's smtp-sink/smtp-source; dnsmasq as the DNS server for MX tests.
# Installed only when missing. With --bench, also what only the benchmarks use:
# unbound, their DNS server for many domains.
need=()
installing_unbound=0
if [ "${1:-}" = "--bench" ]; then
  if ! command -v unbound >/dev/null && ! [ -x /usr/sbin/unbound ]; then
    need+=(unbound)
    installing_unbound=1
  fi
fi
command -v swaks >/dev/null || need+=(swaks)
command -v curl >/dev/null || need+=(curl)
# gannetctl top is driven in a real terminal: tmux (send keys, read the screen).
command -v tmux >/dev/null || need+=(tmux)
perl -MIO::Socket::SSL -e1 2>/dev/null || need+=(libio-socket-ssl-perl libnet-ssleay-perl)
[ -x /usr/sbin/smtp-sink ] || need+=(postfix)
command -v dnsmasq >/dev/null || need+=(dnsmasq-base)
# A SOCKS5 server (with username and password) for the egress-proxy tests.
command -v microsocks >/dev/null || need+=(microsocks)
command -v openssl >/dev/null || need+=(openssl)
command -v python3 >/dev/null || need+=(python3)
# RabbitMQ (AMQP 0-9-1), the event hose's broker: each test starts its own node (and
# its own epmd) on free loopback ports; the package's service is never started.
installing_rabbitmq=0
if ! [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
  need+=(rabbitmq-server)
  installing_rabbitmq=1
fi
# Redis, the cluster's shared store: each test starts its own server on a free
# loopback port; the package's service is never started.
installing_redis=0
if ! command -v redis-server >/dev/null; then
  need+=(redis-server)
  installing_redis=1
fi
# The disk-full test mounts a small ext4 file system from a file (as root).
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v mount >/dev/null || need+=(mount)
# tuning/'s systemd unit is checked by systemd-analyze (verify, security) and its user
# file by systemd-sysusers; gannetd runs as the unit would run it under setpriv.
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v setpriv >/dev/null || need+=(util-linux)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"; }
  install >/dev/null || { apt-get update -q >/dev/null && install >/dev/null; }
fi
if [ "$installing_rabbitmq" = 1 ] && [ -d /run/systemd/system ]; then
  # Tests start their own nodes; the package's would hold 5672 and epmd's 4369.
  systemctl disable --now rabbitmq-server.service epmd.socket epmd.service >/dev/null 2>&1 || true
fi
if [ "$installing_redis" = 1 ] && [ -d /run/systemd/system ]; then
  # Tests start their own servers; the package's would hold 6379.
  systemctl disable --now redis-server.service >/dev/null 2>&1 || true
fi
if [ "$installing_unbound" = 1 ] && [ -d /run/systemd/system ]; then
  # The benchmarks start their own unbound on a loopback port of their own; the
  # package's service would take port 53 (and, with resolvconf, the host's
  # resolver), so the host is left as it was: no DNS server of ours running.
  systemctl disable --now unbound.service unbound-resolvconf.service >/dev/null 2>&1 || true
fi
# Python peers in a venv under target/: aiosmtpd (an independent SMTP server),
# SparkPost's official client library (the HTTP API's real client), dkimpy with
# PyNaCl (an independent DKIM verifier, RSA and Ed25519), pika (RabbitMQ's Python
# client, which reads what the hose published) and dnspython (the DANE tests' DNS
# server, which sets the AD bit for the zones it calls signed).
if ! target/pyenv/bin/python3 -c "import aiosmtpd, sparkpost, dkim, nacl, pika, dns.message" 2>/dev/null; then
  [ -x target/pyenv/bin/python3 ] || python3 -m venv target/pyenv
  target/pyenv/bin/pip install -q aiosmtpd==1.4.6 sparkpost==1.3.10 dkimpy==1.1.8 pynacl==1.5.0 pika==1.3.2 dnspython==2.7.0
fi
