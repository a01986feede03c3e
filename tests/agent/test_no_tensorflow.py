"""A Pi must not need TensorFlow: importing every agent and contract module leaves it out of sys.modules."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import agent
import edgefleet


def test_importing_every_agent_module_does_not_import_tensorflow():
    modules = sorted(m.name for pkg in (agent, edgefleet)
                     for m in pkgutil.walk_packages(pkg.__path__, prefix=f"{pkg.__name__}."))
    assert {"agent.engine", "edgefleet.profiles", "edgefleet.testing.simulator"} <= set(modules)
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "import agent; agent.Engine\n"
        "bad = sorted(m for m in sys.modules if m == 'tensorflow' or m.startswith(('tensorflow.', 'keras')))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 0, f"agent imported TensorFlow/Keras: {proc.stdout} {proc.stderr[-2000:]}"
