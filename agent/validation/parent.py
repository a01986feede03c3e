"""Validate a model file in a child process, so a malformed flatbuffer cannot take the caller down.

``validate_model(path, profile=None, manifest=None, timeout_s=30)`` runs ``python -m agent.validation.child``
which loads and allocates the model (naming any unresolved custom op), checks its inputs and
outputs against the manifest, runs the manifest's golden samples (``golden.atol`` and top-1), or
one synthetic input when there are none, rejects NaN/Inf outputs and measures latency against
``profile.limits.latency_budget_ms``. It prints one JSON line; the parent turns that, a crash
(signal), a timeout or garbage into a frozen :class:`ValidationReport`. The caller never raises
because of the model: every failure is ``ok=False`` with a one-line ``reason``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.validation.report import ValidationReport, fail

__all__ = ["validate_model"]


def validate_model(path: str | os.PathLike[str], profile: Any = None, manifest: Any = None,
                   timeout_s: float = 30.0) -> ValidationReport:
    """Check in a child process that the model at ``path`` loads, runs and matches its manifest.

    ``path`` is a ``.tflite`` file or an artifact directory (its manifest is used unless one is
    given). ``profile`` is a name, a path or a Profile (``None``: the default for this machine's
    architecture, see :func:`edgefleet.profiles.default_profile`); ``manifest`` a Manifest, a dict or None.
    Never raises for a bad model, a crash or a timeout: those come back as ``ok=False``.
    """
    path = Path(path)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edgefleet-sandbox-") as tmp:
        cmd = [sys.executable, "-m", "agent.validation.child", "--model", str(path)]
        try:
            if profile is not None:
                cmd += ["--profile", _profile_arg(profile, Path(tmp))]
            if manifest is not None:
                manifest_file = Path(tmp) / "manifest.json"
                manifest_file.write_text(json.dumps(_manifest_dict(manifest)))
                cmd += ["--manifest", str(manifest_file)]
        except (TypeError, ValueError, OSError) as exc:
            return fail(f"cannot pass the profile or manifest to the validator: {exc}")
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONFAULTHANDLER="")
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout_s, env=env,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return fail(f"validation timed out after {timeout_s:g} s (the model hangs or is far too slow)")
        except OSError as exc:
            return fail(f"cannot start the validation process: {exc}")
    elapsed = round(time.monotonic() - started, 3)
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        return fail(f"the runtime crashed ({name}) while loading or running the model; the file is corrupt "
                     "or not a TFLite model", returncode=proc.returncode, seconds=elapsed)
    line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("{")), None)
    if line is None:
        last = next((ln.strip() for ln in reversed(proc.stderr.splitlines()) if ln.strip()), "no output")
        return fail(f"validation process failed (exit {proc.returncode}): {last}", returncode=proc.returncode)
    try:
        report = ValidationReport.from_json(json.loads(line))
    except (ValueError, KeyError, TypeError) as exc:
        return fail(f"validation process printed an unreadable report: {exc}")
    return ValidationReport(ok=report.ok, reason=report.reason, latency_ms=report.latency_ms,
                            inputs=report.inputs, outputs=report.outputs, golden=report.golden,
                            details={**report.details, "seconds": elapsed})


def _profile_arg(profile: Any, tmp: Path) -> str:
    if isinstance(profile, (str, os.PathLike)):
        return str(profile)
    file = tmp / "profile.json"
    file.write_text(profile.model_dump_json())
    return str(file)


def _manifest_dict(manifest: Any) -> dict[str, Any]:
    if isinstance(manifest, Mapping):
        return dict(manifest)
    return manifest.to_json_dict()
