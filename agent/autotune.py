"""Choose the interpreter pool's layout (threads per interpreter x interpreters) by measuring.

Why: the best layout depends on the model and the board (a tiny model loses with more threads,
a large one on a 4-core Pi gains), so the engine tries a few for a fraction of a second when it
loads a model. The budget is fixed; a model too slow to measure within it keeps the profile's
layout, and the result says why. Nothing here runs on the inference path.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.tensors import TensorInfo

__all__ = ["Layout", "TuneResult", "choose_layout"]

_AUTOTUNE_BUDGET_S = 0.4


@dataclass(frozen=True)
class Layout:
    """How the interpreter pool is laid out: threads per interpreter x interpreters."""

    threads: int
    instances: int


@dataclass(frozen=True)
class TuneResult:
    """The chosen layout, every candidate's score, and why the search was skipped (if it was)."""

    layout: Layout
    candidates: list[dict[str, Any]] = field(default_factory=list)
    note: str | None = None


def _candidates(default: Layout, cores: int, objective: str) -> list[Layout]:
    thread_options = sorted({1, default.threads, cores} & set(range(1, cores + 1)))
    if objective == "latency":
        return [Layout(t, default.instances) for t in thread_options]
    return [Layout(t, i) for t in thread_options for i in sorted({1, 2, default.instances, cores})
            if t * i <= max(cores, default.threads * default.instances)]


def choose_layout(first: Any, default: Layout, cores: int, inputs: Sequence[TensorInfo], objective: str,
             open_interpreter: Callable[[int], Any]) -> TuneResult:
    """Try a few layouts and keep the best for ``objective`` ("latency" or "throughput").

    ``first`` is an interpreter already open with ``default.threads`` (it is warmed up and reused);
    ``open_interpreter(threads)`` opens more. Inputs are zeros: the timing, not the answer, matters.
    """
    candidates = _candidates(default, cores, objective)
    if len(candidates) <= 1:
        return TuneResult(default)
    zeros = [np.zeros(t.shape, t.dtype) for t in inputs]
    budget = _AUTOTUNE_BUDGET_S / len(candidates)
    for info, z in zip(inputs, zeros):
        first.set_tensor(info.index, z)
    t0 = time.perf_counter()
    first.invoke()  # also the warm-up of the first interpreter
    one_call = time.perf_counter() - t0
    if one_call > budget / 4:  # too slow to measure in the budget: keep the profile's layout
        return TuneResult(default, note=(f"skipped: one inference takes {one_call * 1000:.1f} ms, too long for "
                                         f"the {_AUTOTUNE_BUDGET_S:g} s autotune budget"))
    best, best_score = default, -1.0
    report: list[dict[str, Any]] = []
    unit = "1/p50_ms" if objective == "latency" else "inferences/s"
    for layout in candidates:
        count = 1 if objective == "latency" else layout.instances
        interpreters = [first if layout.threads == default.threads and i == 0 else open_interpreter(layout.threads)
                        for i in range(count)]
        score = _measure(interpreters, inputs, zeros, budget, objective)
        report.append({"threads": layout.threads, "instances": layout.instances, "score": round(score, 2),
                       "unit": unit})
        if score > best_score:
            best, best_score = layout, score
    return TuneResult(best, report)


def _measure(interpreters: list[Any], inputs: Sequence[TensorInfo], zeros: list[np.ndarray],
             budget_s: float, objective: str) -> float:
    """Score one layout: 1/p50 latency (ms) for "latency", inferences per second for "throughput"."""
    def loop(interp: Any, deadline: float, times: list[float]) -> None:
        for info, z in zip(inputs, zeros):
            interp.set_tensor(info.index, z)
        interp.invoke()  # warm-up
        while (now := time.perf_counter()) < deadline:
            interp.invoke()
            times.append(time.perf_counter() - now)

    deadline = time.perf_counter() + budget_s
    if objective == "latency" or len(interpreters) == 1:
        times: list[float] = []
        loop(interpreters[0], deadline, times)
        if objective == "latency":
            return 1.0 / max(float(np.median(times)) * 1000.0, 1e-6) if times else 0.0
        return len(times) / budget_s
    per_thread: list[list[float]] = [[] for _ in interpreters]
    threads = [threading.Thread(target=loop, args=(it, deadline, t)) for it, t in zip(interpreters, per_thread)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return sum(len(t) for t in per_thread) / budget_s
