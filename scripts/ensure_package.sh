#!/usr/bin/env bash
# Make sure a server binary the tests start privately exists: ensure_package.sh BINARY DEBIAN_PACKAGE
# BINARY is a command name, or a path glob (/usr/lib/postgresql/*/bin/initdb). As root with
# apt-get it installs the package; otherwise it prints the one command to run. A system service
# the package starts on its standard port is never used by the tests.
set -euo pipefail
binary=$1 package=$2
if [[ $binary == */* ]]; then
  compgen -G "$binary" >/dev/null && exit 0
elif command -v "$binary" >/dev/null 2>&1 || [[ -x /usr/sbin/$binary ]] || [[ -x /usr/bin/$binary ]]; then
  exit 0
fi
if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
  echo "$binary not found: installing $package with apt-get ..."
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$package" >/dev/null
  exit 0
fi
echo "error: $binary is required for the tests; install it with: sudo apt-get install $package" >&2
exit 1
