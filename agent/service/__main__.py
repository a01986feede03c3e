"""``python -m agent.service --config agent.yaml``: the same as ``edge-agent run``."""

from __future__ import annotations

import sys

from agent.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
