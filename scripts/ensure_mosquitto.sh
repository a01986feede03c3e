#!/usr/bin/env bash
# Make sure the mosquitto binary exists (the tests start private brokers from it).
set -euo pipefail
if command -v mosquitto >/dev/null 2>&1 || [[ -x /usr/sbin/mosquitto ]]; then
  exit 0
fi
if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
  echo "mosquitto not found: installing it with apt-get ..."
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
  # Debian starts a system broker on 1883; the tests never use it.
  exit 0
fi
echo "error: the mosquitto binary is required for the tests; install it with: sudo apt-get install mosquitto" >&2
exit 1
