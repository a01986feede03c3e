"""Validate a model file in a child process, so a malformed flatbuffer cannot take the caller down.

``validate_model(path, profile=None, manifest=None, timeout_s=30)`` runs ``python -m agent.sandbox``
which loads and allocates the model (naming any unresolved custom op), checks its inputs and
outputs against the manifest, runs the manifest's golden samples (``golden.atol`` and top-1), or
one synthetic input when there are none, rejects NaN/Inf outputs and measures latency against
``profile.limits.latency_budget_ms``. It prints one JSON line; the parent turns that, a crash
(signal), a timeout or garbage into a frozen :class:`ValidationReport`. The caller never raises
because of the model: every failure is ``ok=False`` with a one-line ``reason``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ValidationReport", "check_model", "validate_model"]

_LATENCY_RUNS = 20
_LATENCY_MAX_S = 2.0


@dataclass(frozen=True)
class ValidationReport:
    """Outcome of validating one model file. ``reason`` is one line when ``ok`` is False."""

    ok: bool
    reason: str | None = None
    latency_ms: float | None = None
    inputs: tuple[Mapping[str, Any], ...] = ()
    outputs: tuple[Mapping[str, Any], ...] = ()
    golden: Mapping[str, Any] = field(default_factory=dict)
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "reason": self.reason, "latency_ms": self.latency_ms,
                "inputs": [dict(t) for t in self.inputs], "outputs": [dict(t) for t in self.outputs],
                "golden": dict(self.golden), "details": dict(self.details)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ValidationReport:
        return cls(ok=bool(data["ok"]), reason=data.get("reason"), latency_ms=data.get("latency_ms"),
                   inputs=tuple(data.get("inputs") or ()), outputs=tuple(data.get("outputs") or ()),
                   golden=dict(data.get("golden") or {}), details=dict(data.get("details") or {}))


def _fail(reason: str, **details: Any) -> ValidationReport:
    return ValidationReport(ok=False, reason=reason, details=details)


def validate_model(path: str | os.PathLike[str], profile: Any = None, manifest: Any = None,
                   timeout_s: float = 30.0) -> ValidationReport:
    """Check in a child process that the model at ``path`` loads, runs and matches its manifest.

    ``path`` is a ``.tflite`` file or an artifact directory (its manifest is used unless one is
    given). ``profile`` is a name, a path or a Profile (``None``: the default for this machine's
    architecture, see :func:`agent.engine_cli.default_profile`); ``manifest`` a Manifest, a dict or None.
    Never raises for a bad model, a crash or a timeout: those come back as ``ok=False``.
    """
    path = Path(path)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edgefleet-sandbox-") as tmp:
        cmd = [sys.executable, "-m", "agent.sandbox", "--model", str(path)]
        try:
            if profile is not None:
                cmd += ["--profile", _profile_arg(profile, Path(tmp))]
            if manifest is not None:
                manifest_file = Path(tmp) / "manifest.json"
                manifest_file.write_text(json.dumps(_manifest_dict(manifest)))
                cmd += ["--manifest", str(manifest_file)]
        except (TypeError, ValueError, OSError) as exc:
            return _fail(f"cannot pass the profile or manifest to the validator: {exc}")
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONFAULTHANDLER="")
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout_s, env=env,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return _fail(f"validation timed out after {timeout_s:g} s (the model hangs or is far too slow)")
        except OSError as exc:
            return _fail(f"cannot start the validation process: {exc}")
    elapsed = round(time.monotonic() - started, 3)
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        return _fail(f"the runtime crashed ({name}) while loading or running the model; the file is corrupt "
                     "or not a TFLite model", returncode=proc.returncode, seconds=elapsed)
    line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("{")), None)
    if line is None:
        last = next((ln.strip() for ln in reversed(proc.stderr.splitlines()) if ln.strip()), "no output")
        return _fail(f"validation process failed (exit {proc.returncode}): {last}", returncode=proc.returncode)
    try:
        report = ValidationReport.from_json(json.loads(line))
    except (ValueError, KeyError, TypeError) as exc:
        return _fail(f"validation process printed an unreadable report: {exc}")
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


# ---------------------------------------------------------------------------------- child side
def check_model(model: str | os.PathLike[str], profile: Any = None, manifest: Any = None) -> ValidationReport:
    """The checks themselves, in *this* process (the child calls it; use validate_model instead)."""
    import numpy as np

    from agent.engine import Engine
    from agent.errors import EdgefleetError
    from agent.manifest import parse_manifest
    from agent.profiles import Profile, load_profile

    try:
        if profile is None:
            from agent.engine_cli import default_profile

            prof = load_profile(default_profile())
        elif isinstance(profile, Profile):
            prof = profile
        elif str(profile).endswith(".json"):
            prof = Profile.model_validate_json(Path(profile).read_text())
        else:
            prof = load_profile(profile)
        man = manifest if manifest is None or not isinstance(manifest, (dict, str, bytes)) else parse_manifest(
            manifest, "manifest")
        engine = Engine(model, profile=prof, threads=1, instances=1, autotune=False, cache=None)
    except EdgefleetError as exc:
        return _fail(str(exc))
    man = man or engine.manifest
    inputs = tuple(t.to_json() for t in engine.input_details)
    outputs = tuple(t.to_json() for t in engine.output_details)
    base: dict[str, Any] = {"inputs": inputs, "outputs": outputs}
    details: dict[str, Any] = {"runtime": engine.stats()["runtime"], "accelerator": engine.accelerator,
                               "sha256": engine.sha256}
    if man is not None:
        mismatch = _contract_mismatch(man, engine)
        if mismatch:
            return ValidationReport(ok=False, reason=mismatch, details=details, **base)
    golden: dict[str, Any] = {"samples": 0, "passed": 0}
    try:
        samples = man.golden_arrays() if man is not None and man.golden else []
        if samples:
            atol, need_top1 = man.golden.atol, man.golden.require_top1
            worst = 0.0
            for i, (feed, expected) in enumerate(samples):
                got = engine.infer(feed)
                got_map = got if isinstance(got, dict) else {engine.output_details[0].name: got}
                for name, want in expected.items():
                    if name not in got_map:
                        return ValidationReport(ok=False, reason=f"golden sample {i} names output {name!r}, "
                                                f"which the model does not have", golden=golden,
                                                details=details, **base)
                    have = np.asarray(got_map[name], dtype=np.float32).ravel()
                    if have.size != want.size:
                        return ValidationReport(ok=False, reason=f"golden sample {i} output {name!r}: expected "
                                                f"{want.size} values, got {have.size}", golden=golden,
                                                details=details, **base)
                    if not np.all(np.isfinite(have)):
                        return ValidationReport(ok=False, reason=f"output {name!r} has NaN or Inf values",
                                                golden=golden, details=details, **base)
                    diff = float(np.abs(have - want).max(initial=0.0))
                    worst = max(worst, diff)
                    if diff > atol:
                        return ValidationReport(ok=False, reason=f"golden sample {i} output {name!r}: max abs "
                                                f"difference {diff:.4g} exceeds atol {atol:g}",
                                                golden={**golden, "max_abs_diff": diff}, details=details, **base)
                    if need_top1 and want.size > 1 and int(np.argmax(have)) != int(np.argmax(want)):
                        return ValidationReport(ok=False, reason=f"golden sample {i} output {name!r}: top-1 "
                                                f"{int(np.argmax(have))}, expected {int(np.argmax(want))}",
                                                golden=golden, details=details, **base)
                golden["passed"] += 1
            golden.update(samples=len(samples), max_abs_diff=worst, atol=atol)
        feed = {t.name: _synthetic(t) for t in engine.input_details}
        got = engine.infer(feed)
        for name, arr in (got.items() if isinstance(got, dict) else [(engine.output_details[0].name, got)]):
            if not np.all(np.isfinite(arr)):
                return ValidationReport(ok=False, reason=f"output {name!r} has NaN or Inf values",
                                        golden=golden, details=details, **base)
        times = []
        deadline = time.perf_counter() + _LATENCY_MAX_S
        for _ in range(_LATENCY_RUNS):
            t0 = time.perf_counter()
            engine.infer(feed)
            times.append(time.perf_counter() - t0)
            if t0 > deadline:
                break
    except EdgefleetError as exc:
        return ValidationReport(ok=False, reason=str(exc), golden=golden, details=details, **base)
    latency_ms = round(float(np.median(times)) * 1000.0, 4)
    budget = prof.limits.latency_budget_ms
    details["latency_budget_ms"] = budget
    if latency_ms > budget:
        return ValidationReport(ok=False, reason=f"median latency {latency_ms:.1f} ms exceeds the profile's "
                                f"budget {budget:g} ms", latency_ms=latency_ms, golden=golden, details=details, **base)
    return ValidationReport(ok=True, latency_ms=latency_ms, golden=golden, details=details, **base)


def _synthetic(info: Any) -> Any:
    import numpy as np

    rng = np.random.default_rng(0)
    if info.dtype.kind in "iu":
        limits = np.iinfo(info.dtype)
        return rng.integers(limits.min, limits.max, size=info.shape, endpoint=True).astype(info.dtype)
    return rng.uniform(0.0, 1.0, size=info.shape).astype(info.dtype)


def _contract_mismatch(manifest: Any, engine: Any) -> str | None:
    """Compare the manifest's declared tensors with the model's (names, shapes, dtypes)."""
    for kind, declared, actual in (("input", manifest.inputs, engine.input_details),
                                   ("output", manifest.outputs, engine.output_details)):
        have = {t.name: t for t in actual}
        for spec in declared:
            t = have.get(spec.name)
            if t is None:
                return f"manifest declares {kind} {spec.name!r}; the model has {sorted(have)}"
            if list(t.shape) != list(spec.shape) or t.dtype.name != spec.dtype:
                return (f"{kind} {spec.name!r}: manifest says {spec.dtype}{list(spec.shape)}, "
                        f"model has {t.dtype.name}{list(t.shape)}")
        if len(declared) != len(actual):
            return f"manifest declares {len(declared)} {kind}s, the model has {len(actual)}"
    return None


def _child(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.sandbox")
    parser.add_argument("--model", required=True)
    parser.add_argument("--profile")
    parser.add_argument("--manifest")
    args = parser.parse_args(argv)
    try:
        manifest = Path(args.manifest).read_text() if args.manifest else None
        report = check_model(args.model, args.profile, manifest)
    except Exception as exc:  # noqa: BLE001 (the report is the error channel of this process)
        report = _fail(f"validation failed unexpectedly: {type(exc).__name__}: {exc}")
    sys.stdout.write(json.dumps(report.to_json()) + "\n")
    sys.stdout.flush()
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
