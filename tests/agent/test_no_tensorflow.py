"""A Pi must not need TensorFlow: importing every agent module leaves it out of sys.modules."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import agent


def test_importing_every_agent_module_does_not_import_tensorflow():
    modules = sorted(m.name for m in pkgutil.walk_packages(agent.__path__, prefix="agent."))
    assert "edgefleet.profiles" in modules and len(modules) >= 5
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
