#!/usr/bin/env bash
# `make test-arm64`: the agent's runtime tests on emulated 64-bit Raspberry Pi OS (Debian bookworm
# arm64, Python 3.11) under qemu-user-static. See docs/arm64.md.
#
#   1. scripts/arm64_root.sh prepare        the root, built once outside the checkout, then reused
#   2. pip wheel --no-deps . (host)          the package as it ships
#   3. scripts/arm64_artifacts.py (host)     the digits CNN converted on x86 for each aarch64 profile
#   4. inside the root (scripts/arm64_inside.sh): pip install 'edgefleet-*.whl[agent]' into a venv,
#      pytest -m runtime tests/agent against the installed package, edge-agent run against a
#      mosquitto in the root, edge-agent validate of the x86 artifacts (scripts/arm64_checks.py)
#
# Exit: 0 passed; 3 the root cannot be prepared on this machine (one line says why); else failed.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
ROOT=${EDGEFLEET_ARM64_ROOT:-/var/cache/edgefleet/arm64-bookworm}
PY=${PY:-.venv/bin/python}
WORK=build/arm64
t0=$SECONDS

rc=0
scripts/arm64_root.sh prepare || rc=$?
if ((rc != 0)); then
  exit $rc
fi

echo "arm64: building the wheel on the host ..."
rm -rf "$WORK/dist"
"$PY" -m pip wheel -q --no-deps . -w "$WORK/dist" >/dev/null
wheel=$(ls "$WORK"/dist/edgefleet-*.whl)

"$PY" scripts/arm64_artifacts.py --out "$WORK/artifacts"

# Stage what runs inside: the wheel, the tests (not the sources: the tests import the installed
# package), pytest's settings, the profiles as data (device_profiles/*.yaml, no package) and the
# artifacts. Fresh every run.
STAGE="$ROOT/opt/edgefleet-test"
rm -rf --one-file-system "$STAGE"
mkdir -p "$STAGE/dist" "$STAGE/device_profiles" "$STAGE/artifacts"
cp "$wheel" "$STAGE/dist/"
tar -C "$REPO" --exclude=__pycache__ --exclude='*.pyc' -cf - tests | tar -C "$STAGE" -xf -
cp pyproject.toml "$STAGE/"
cp device_profiles/*.yaml "$STAGE/device_profiles/"
for art in "$WORK"/artifacts/*/; do
  [[ -f $art/manifest.json ]] && cp -r "$art" "$STAGE/artifacts/"
done
cp scripts/arm64_inside.sh scripts/arm64_checks.py "$STAGE/"
echo "arm64: host side ready in $((SECONDS - t0)) s; entering the emulated root"

rc=0
scripts/arm64_root.sh run /bin/bash /opt/edgefleet-test/arm64_inside.sh || rc=$?
if ((rc == 0)); then
  echo "arm64: make test-arm64 passed in $((SECONDS - t0)) s (wall time; emulated, not a performance figure)"
else
  echo "arm64: make test-arm64 FAILED (exit $rc) after $((SECONDS - t0)) s"
  # 3 is reserved for "cannot prepare": a failure inside is always a failure.
  ((rc == 3)) && rc=1
fi
exit $rc
