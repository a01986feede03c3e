"""The validation child: ``python -m agent.validation.child --model M [--profile P] [--manifest F]``.

Loads and allocates the model (naming any unresolved custom op), checks its inputs and outputs
against the manifest, runs the manifest's golden samples (``golden.atol`` and top-1), or one
synthetic input when there are none, rejects NaN/Inf outputs and measures latency against the
profile's budget. It prints one JSON :class:`ValidationReport` line and exits; only the parent
(:mod:`agent.validation.parent`) starts it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from agent.validation.report import ValidationReport, fail

__all__ = ["check_model"]

_LATENCY_RUNS = 20
_LATENCY_MAX_S = 2.0


def check_model(model: str | os.PathLike[str], profile: Any = None, manifest: Any = None) -> ValidationReport:
    """The checks themselves, in *this* process (the child calls it; use validate_model instead)."""
    import numpy as np

    from agent.engine import Engine
    from agent.validation.parent import resolve_profile
    from edgefleet.errors import EdgefleetError
    from edgefleet.manifest import parse_manifest
    from edgefleet.quant import top1

    try:
        prof = resolve_profile(profile)
        man = manifest if manifest is None or not isinstance(manifest, (dict, str, bytes)) else parse_manifest(
            manifest, "manifest")
        engine = Engine(model, profile=prof, threads=1, instances=1, autotune=False, cache=None)
    except EdgefleetError as exc:
        return fail(_out_of_memory(exc.__cause__) or str(exc))
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
                    got_top, want_top = int(top1(have)), int(top1(want))
                    if need_top1 and want.size > 1 and got_top != want_top:
                        return ValidationReport(ok=False, reason=f"golden sample {i} output {name!r}: top-1 "
                                                f"{got_top}, expected {want_top}",
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


def _out_of_memory(exc: BaseException | None) -> str | None:
    """The reason for an allocation that failed under RLIMIT_AS, or None when it was something else.

    The runtime reports a failed arena allocation as a RuntimeError with no message at all.
    """
    import resource

    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit == resource.RLIM_INFINITY:
        return None
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and not str(exc).strip()):
        return (f"the model needs more memory than the validation limit allows (RLIMIT_AS {limit >> 20} MB, "
                "from the profile's hardware.memory_mb): the runtime could not allocate it")
    return None


def _child(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.validation.child")
    parser.add_argument("--model", required=True)
    parser.add_argument("--profile")
    parser.add_argument("--manifest")
    parser.add_argument("--wait-for-limits", action="store_true",
                        help="read one line from stdin first (the parent sets resource limits meanwhile)")
    args = parser.parse_args(argv)
    if args.wait_for_limits and not sys.stdin.readline():
        return 2  # the parent is gone: never run the model without its limits
    try:
        manifest = Path(args.manifest).read_text() if args.manifest else None
        report = check_model(args.model, args.profile, manifest)
    except MemoryError as exc:
        report = fail(_out_of_memory(exc) or "validation ran out of memory")
    except Exception as exc:  # noqa: BLE001 (the report is the error channel of this process)
        report = fail(f"validation failed unexpectedly: {type(exc).__name__}: {exc}")
    sys.stdout.write(json.dumps(report.to_json()) + "\n")
    sys.stdout.flush()
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
