"""Validate a model file in a child process, so a malformed flatbuffer cannot take the caller down.

``validate_model(path, profile=None, manifest=None, timeout_s=30)`` runs ``python -m agent.validation.child``
which loads and allocates the model (naming any unresolved custom op), checks its inputs and
outputs against the manifest, runs the manifest's golden samples (``golden.atol`` and top-1), or
one synthetic input when there are none, rejects NaN/Inf outputs and measures latency against
``profile.limits.latency_budget_ms``. It prints one JSON line; the parent turns that, a crash
(signal), a timeout or garbage into a frozen :class:`ValidationReport`. The caller never raises
because of the model: every failure is ``ok=False`` with a one-line ``reason``.

The child runs under resource limits (:class:`SandboxLimits`, from the profile's RAM): address
space (RLIMIT_AS), CPU time (RLIMIT_CPU) and file size (RLIMIT_FSIZE), so a model that asks for
gigabytes or spins cannot starve the agent serving next to it. The parent sets them on the
started child with ``prlimit`` (no ``preexec_fn``: the agent is multi-threaded) and only then
lets it open the model (it waits for a line on stdin).
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent.validation.report import ValidationReport, fail

__all__ = ["SandboxLimits", "resolve_profile", "sandbox_limits", "validate_model"]

_MB = 1024 * 1024
_AS_FLOOR_MB = 512   # a normal validation maps ~190 MB (VmPeak, x86-64, ai-edge-litert 2.3): room to spare
_AS_RAM_SHARE = 0.5  # of the device's RAM (profile hardware.memory_mb): the agent needs the rest
_MODEL_COPIES = 3    # the file's bytes, the interpreter's copy, the weights the delegate packs
_CPU_MARGIN_S = 10   # CPU time on top of the wall-clock timeout (imports, a second thread)
_FILE_BYTES = 16 * _MB  # the child writes no files; anything big is a runaway


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of the validation child, so a model cannot starve the device."""

    address_space_bytes: int  # RLIMIT_AS: virtual memory, bytes (allocations beyond it fail)
    cpu_s: int                # RLIMIT_CPU: CPU time, s (then SIGXCPU)
    file_bytes: int           # RLIMIT_FSIZE: largest file it may write, bytes


def sandbox_limits(profile: Any, model_bytes: int, timeout_s: float) -> SandboxLimits:
    """Limits for validating a ``model_bytes`` model on a device with ``profile``'s RAM."""
    share = int(profile.hardware.memory_mb * _AS_RAM_SHARE) * _MB
    return SandboxLimits(address_space_bytes=max(_AS_FLOOR_MB * _MB, share) + _MODEL_COPIES * model_bytes,
                         cpu_s=math.ceil(timeout_s) + _CPU_MARGIN_S, file_bytes=_FILE_BYTES)


def resolve_profile(profile: Any) -> Any:
    """A Profile from a Profile, a name, a .yaml path or a .json dump (None: this machine's default).

    Raises:
        ConfigError: unknown name or bad file.
    """
    from edgefleet.profiles import Profile, default_profile, load_profile

    if isinstance(profile, Profile):
        return profile
    if profile is None:
        return load_profile(default_profile())
    if str(profile).endswith(".json"):
        return Profile.model_validate_json(Path(profile).read_text())
    return load_profile(profile)


def validate_model(path: str | os.PathLike[str], profile: Any = None, manifest: Any = None,
                   timeout_s: float = 30.0, limits: SandboxLimits | None = None) -> ValidationReport:
    """Check in a child process that the model at ``path`` loads, runs and matches its manifest.

    ``path`` is a ``.tflite`` file or an artifact directory (its manifest is used unless one is
    given). ``profile`` is a name, a path or a Profile (``None``: the default for this machine's
    architecture, see :func:`edgefleet.profiles.default_profile`); ``manifest`` a Manifest, a dict or None.
    ``limits`` default to :func:`sandbox_limits` for the profile and the model's size.
    Never raises for a bad model, a crash, a timeout or a limit: those come back as ``ok=False``.
    """
    path = Path(path)
    started = time.monotonic()
    if limits is None:
        try:
            size = sum(f.stat().st_size for f in path.iterdir()) if path.is_dir() else path.stat().st_size
            limits = sandbox_limits(resolve_profile(profile), size, timeout_s)
        except Exception as exc:  # noqa: BLE001 (never raise for what we were given)
            return fail(f"cannot size the validator's limits: {exc}")
    with tempfile.TemporaryDirectory(prefix="edgefleet-sandbox-") as tmp:
        cmd = [sys.executable, "-m", "agent.validation.child", "--model", str(path), "--wait-for-limits"]
        try:
            if profile is not None:
                cmd += ["--profile", _profile_arg(profile, Path(tmp))]
            if manifest is not None:
                manifest_file = Path(tmp) / "manifest.json"
                manifest_file.write_text(json.dumps(_manifest_dict(manifest)))
                cmd += ["--manifest", str(manifest_file)]
        except (TypeError, ValueError, OSError) as exc:
            return fail(f"cannot pass the profile or manifest to the validator: {exc}")
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONFAULTHANDLER="", OPENBLAS_NUM_THREADS="1",
                   PYTHONDONTWRITEBYTECODE="1")
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=env)
        except OSError as exc:
            return fail(f"cannot start the validation process: {exc}")
        with proc:
            limited = _apply_limits(proc.pid, limits)
            try:
                out, err = proc.communicate("go\n", timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                return fail(f"validation timed out after {timeout_s:g} s (the model hangs or is far too slow)")
    elapsed = round(time.monotonic() - started, 3)
    if proc.returncode < 0:
        return fail(_signal_reason(-proc.returncode, limits), returncode=proc.returncode, seconds=elapsed)
    line = next((ln for ln in reversed(out.splitlines()) if ln.startswith("{")), None)
    if line is None:
        last = next((ln.strip() for ln in reversed(err.splitlines()) if ln.strip()), "no output")
        return fail(f"validation process failed (exit {proc.returncode}): {last}", returncode=proc.returncode)
    try:
        report = ValidationReport.from_json(json.loads(line))
    except (ValueError, KeyError, TypeError) as exc:
        return fail(f"validation process printed an unreadable report: {exc}")
    return ValidationReport(ok=report.ok, reason=report.reason, latency_ms=report.latency_ms,
                            inputs=report.inputs, outputs=report.outputs, golden=report.golden,
                            details={**report.details, "seconds": elapsed, "limits": limited})


def _apply_limits(pid: int, limits: SandboxLimits) -> dict[str, Any]:
    """Set the limits on the started child; what was applied (Linux only: prlimit)."""
    prlimit = getattr(resource, "prlimit", None)
    if prlimit is None:
        return {"applied": False, "why": f"no prlimit on {platform.system()}"}
    # The CPU hard limit sits a little above the soft one: SIGXCPU (named in the reason) comes first.
    for which, soft, hard in ((resource.RLIMIT_AS, limits.address_space_bytes, limits.address_space_bytes),
                              (resource.RLIMIT_CPU, limits.cpu_s, limits.cpu_s + 5),
                              (resource.RLIMIT_FSIZE, limits.file_bytes, limits.file_bytes)):
        try:
            prlimit(pid, which, (soft, hard))
        except (OSError, ValueError) as exc:  # the child already exited, or a limit is not allowed here
            return {"applied": False, "why": str(exc)}
    return {"applied": True, **asdict(limits)}


def _signal_reason(signum: int, limits: SandboxLimits) -> str:
    """Why the child died of ``signum``, in terms the operator can act on."""
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    if signum == getattr(signal, "SIGXCPU", None):
        return f"validation used up its CPU-time limit (RLIMIT_CPU {limits.cpu_s} s, {name}): the model spins"
    if signum == getattr(signal, "SIGXFSZ", None):
        return f"validation exceeded its file-size limit (RLIMIT_FSIZE {limits.file_bytes} bytes, {name})"
    if signum == signal.SIGKILL:
        return ("the validation process was killed (SIGKILL: the kernel's OOM killer, or the CPU-time hard limit "
                f"of {limits.cpu_s + 5} s) while running the model; it needs more than this device can give it")
    return (f"the runtime died ({name}) while loading or running the model on this platform "
            f"({platform.machine()}, Python {platform.python_version()}, memory limit RLIMIT_AS "
            f"{limits.address_space_bytes // _MB} MB): this model, or this runtime build, cannot run here; "
            "if every model fails like this, check the runtime install (`edge-agent validate` on a known-good model)")


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
