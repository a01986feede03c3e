#!/usr/bin/env bash
# Runs INSIDE the emulated arm64 root (scripts/test_arm64.sh copies it to /opt/edgefleet-test):
# install the wheel built on the host into a venv, run the agent's runtime tests against the
# installed package, then the end-to-end checks (scripts/arm64_checks.py).
set -euo pipefail
STAGE=/opt/edgefleet-test
VENV=/opt/edgefleet-venv
cd "$STAGE"

machine=$(uname -m)
if [[ $machine != aarch64 ]]; then
  echo "arm64: uname -m says $machine inside the root, not aarch64" >&2
  exit 1
fi
echo "arm64: inside $(sed -n 's/^PRETTY_NAME="\(.*\)"/\1/p' /etc/os-release), $(python3 --version), $machine"

# A venv kept in the root between runs (its dependencies are the slow part under emulation);
# the edgefleet wheel itself is reinstalled every run, so what is tested is what was just built.
if [[ ! -x $VENV/bin/python ]] || ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
fi
wheel=$(ls "$STAGE"/dist/edgefleet-*.whl)
echo "arm64: pip install '$(basename "$wheel")[agent]' pytest pytest-timeout hypothesis into $VENV ..."
"$VENV/bin/python" -m pip install -q --force-reinstall --no-deps "$wheel"
"$VENV/bin/python" -m pip install -q "$wheel[agent]" pytest pytest-timeout 'hypothesis>=6.100'
"$VENV/bin/python" -m pip check
"$VENV/bin/python" -m pip list 2>/dev/null | grep -i -E '^(ai-edge-litert|numpy|psutil|pillow|cryptography|paho-mqtt|xxhash|pydantic) ' |
  awk '{printf "%s %s; ", $1, $2} END {print ""}' | sed 's/^/arm64: installed: /'

# The tests must exercise the INSTALLED package: nothing in $STAGE may shadow it.
"$VENV/bin/python" - <<'EOF'
import sys
sys.path.insert(0, "/opt/edgefleet-test")  # where pytest's rootdir insertion puts it
import agent, converter, device_profiles, edgefleet, fleet  # noqa: E401
for mod in (agent, converter, device_profiles, edgefleet, fleet):
    where = getattr(mod, "__file__", None) or str(list(mod.__path__))
    if "/opt/edgefleet-venv/" not in where:
        sys.exit(f"arm64: {mod.__name__} imports from {where}, not from the installed wheel")
print("arm64: agent, edgefleet, device_profiles import from the installed wheel")
EOF

echo "arm64: pytest -m runtime tests/agent (emulated; slow) ..."
"$VENV/bin/python" -m pytest -m runtime tests/agent -p no:cacheprovider --junitxml=/tmp/arm64-junit.xml

"$VENV/bin/python" "$STAGE/arm64_checks.py"
