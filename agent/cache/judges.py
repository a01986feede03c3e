"""Whether a reused answer is the same answer: top-1 for classifiers, a tolerance per output for other
models, and for outputs with roles (manifest ``output_roles``) detections judged on their scores and
boxes. Also the margin of an answer: how close it was to changing."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from edgefleet.quant import top1

__all__ = ["OutputJudge", "output_change", "output_judges", "output_ranges", "output_tolerances"]

_INF = math.inf
_FLIP = 2.0  # output_change of a classifier whose top-1 changed (anything > 1 disagrees)


class OutputJudge(NamedTuple):
    """How one output is judged when a reuse is compared with a fresh result (docs/cache.md, "Output roles").

    ``role``: ``logits`` (top-1), ``regression`` (within tolerance x range, the default),
    ``scores`` (after ``activation``, only where either result has a score >= ``threshold``),
    ``boxes`` / ``landmarks`` (per-anchor values, only at the anchors output ``scores`` detects).
    """

    role: str = "regression"
    activation: str = "none"
    threshold: float = 0.5
    scores: int = -1


def output_judges(resolved: Mapping[int, tuple[Any, int]], outputs: int) -> tuple[OutputJudge, ...]:
    """One judge per output from :func:`edgefleet.manifest.resolve_output_roles`; undeclared: regression."""
    judges = [OutputJudge()] * outputs
    for i, (role, link) in resolved.items():
        judges[i] = OutputJudge(role.role, role.activation or "none",
                                role.score_threshold if role.role == "scores" else 0.5, link)
    return tuple(judges)


def _activate(arr: np.ndarray, judge: OutputJudge) -> np.ndarray:
    if judge.activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-np.clip(arr, -80.0, 80.0)))
    if judge.activation == "softmax":
        shifted = np.exp(arr - arr.max(axis=-1, keepdims=True))
        return shifted / shifted.sum(axis=-1, keepdims=True)
    return arr


def _anchor_rows(arr: np.ndarray) -> np.ndarray:
    """Per-anchor values ``[anchors, values]`` of a boxes/landmarks output ``[1, ..., anchors, values]``."""
    return arr.reshape(-1, arr.shape[-1] if arr.ndim >= 2 else 1)


def _anchor_mask(detected: np.ndarray, anchors: int) -> np.ndarray:
    """Which anchors have a detection, from a scores output's element mask (any class counts)."""
    return detected.reshape(anchors, -1).any(axis=1)


def _roles_change(reused: Sequence[np.ndarray], fresh: Sequence[np.ndarray], judges: Sequence[OutputJudge],
                  tolerances: Sequence[float]) -> float:
    worst = 0.0
    detected: dict[int, np.ndarray] = {}  # scores output -> element mask: a detection in either result
    for k, judge in enumerate(judges):
        if judge.role == "scores":
            old, new = _activate(reused[k], judge), _activate(fresh[k], judge)
            either = (old >= judge.threshold) | (new >= judge.threshold)
            detected[k] = either
            if either.any():
                diff = float(np.abs(old - new)[either].max())
                worst = max(worst, _in_tolerances(diff, tolerances[k]))
    for k, judge in enumerate(judges):
        if judge.role == "logits":
            if not np.array_equal(top1(reused[k]), top1(fresh[k])):
                return _FLIP
        elif judge.role in ("boxes", "landmarks"):
            old, new = _anchor_rows(reused[k]), _anchor_rows(fresh[k])
            mask = _anchor_mask(detected[judge.scores], old.shape[0])
            if mask.any():
                worst = max(worst, _in_tolerances(float(np.abs(old[mask] - new[mask]).max()), tolerances[k]))
        elif judge.role == "regression":
            worst = max(worst, _in_tolerances(float(np.abs(reused[k] - fresh[k]).max(initial=0.0)), tolerances[k]))
    return worst


def _in_tolerances(diff: float, tol: float) -> float:
    return diff / tol if tol > 0 else (_INF if diff > 0 else 0.0)


def output_change(reused: Sequence[np.ndarray], fresh: Sequence[np.ndarray], *, classifier: bool,
                  tolerances: Sequence[float], judges: Sequence[OutputJudge] | None = None) -> float:
    """How far reusing ``reused`` would be from ``fresh``, in tolerances: <= 1 agrees.

    With ``judges`` (the manifest's ``output_roles``), each output is judged by its role: logits
    on their top-1, detection scores after their activation where some result detects, boxes and
    landmarks only at detected anchors, regression outputs everywhere. Without: classifiers give
    0 when every output keeps its top-1, else 2; other models the largest absolute difference of
    any output divided by that output's tolerance. ``tolerances``: one per output, in the
    outputs' own units (see :func:`output_tolerances`). Arrays are float.
    """
    if judges is not None:
        return _roles_change(reused, fresh, judges, tolerances)
    worst = 0.0
    for old, new, tol in zip(reused, fresh, tolerances):
        if classifier:
            if not np.array_equal(top1(old), top1(new)):
                return _FLIP
            continue
        worst = max(worst, _in_tolerances(float(np.abs(old - new).max(initial=0.0)), tol))
    return worst


def output_ranges(fresh: Sequence[np.ndarray], judges: Sequence[OutputJudge] | None) -> list[tuple[float, float]]:
    """The value range each output of one result spans, as its tolerance measures it.

    Activated scores span 0..1; boxes and landmarks count only at the anchors this result
    detects (none: an empty range, ``(inf, -inf)``); anything else its whole array.
    """
    ranges = []
    for k, arr in enumerate(fresh):
        judge = judges[k] if judges is not None else None
        if arr.size == 0:
            ranges.append((_INF, -_INF))
        elif judge is not None and judge.role == "scores" and judge.activation != "none":
            ranges.append((0.0, 1.0))
        elif judge is not None and judge.role in ("boxes", "landmarks"):
            rows = _anchor_rows(arr)
            scores = _activate(fresh[judge.scores], judges[judge.scores])  # type: ignore[index]
            chosen = rows[_anchor_mask(scores >= judges[judge.scores].threshold, rows.shape[0])]  # type: ignore[index]
            ranges.append((float(chosen.min()), float(chosen.max())) if chosen.size else (_INF, -_INF))
        else:
            ranges.append((float(arr.min()), float(arr.max())))
    return ranges


def output_tolerances(results: Iterable[Sequence[np.ndarray]], judges: Sequence[OutputJudge] | None,
                      output_tolerance: float) -> list[float]:
    """Each output's tolerance over ``results``: ``output_tolerance`` x the range its values took there."""
    lo: list[float] = []
    hi: list[float] = []
    for fresh in results:
        for k, (a, b) in enumerate(output_ranges(fresh, judges)):
            if k == len(lo):
                lo.append(_INF)
                hi.append(-_INF)
            lo[k], hi[k] = min(lo[k], a), max(hi[k], b)
    return _scaled(lo, hi, output_tolerance)


def _scaled(lo: Sequence[float], hi: Sequence[float], tol: float) -> list[float]:
    return [tol * max(b - a, 1e-6) if b >= a else tol * 1e-6 for a, b in zip(lo, hi)]


def _margin(outputs: Sequence[np.ndarray]) -> float:
    """Top-1 minus top-2 score of each output, the smallest one (0 = a tie: never reuse)."""
    margin = _INF
    for arr in outputs:
        flat = arr.reshape(-1)
        if flat.size >= 2:
            top2 = np.partition(flat, flat.size - 2)[-2:]
            margin = min(margin, float(top2[1] - top2[0]))
    return margin
