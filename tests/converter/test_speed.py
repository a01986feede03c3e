"""Speed is part of the target: candidates are timed with the device's runtime, classed by their
kernels, and one past the profile's ``max_slowdown`` never ships, however faithful."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from converter.fidelity import Metrics
from converter.kernels import kernel_class
from converter.quantize import Recipe
from converter.search import Candidate, SearchResult, judge_speed, most_faithful, pick
from converter.stats import wilson
from converter.tflite_inspect import inspect_tflite
from edgefleet.profiles import load_profile, profile_dir

MODELS = Path(__file__).resolve().parents[1] / "data" / "models"
FER = MODELS / "wild" / "fer_mini_xception_emotion.hdf5"


def test_kernel_class_follows_the_ops_and_tensor_types_in_the_flatbuffer() -> None:
    int8 = inspect_tflite((MODELS / "int8.tflite").read_bytes())
    assert kernel_class(int8) == "xnnpack-int8"
    assert kernel_class(int8, "edgetpu", edgetpu_ok=True) == "edgetpu"
    assert kernel_class(inspect_tflite((MODELS / "float.tflite").read_bytes())) == "float-fallback"


def _candidate(name: str, kernel: str, ms: float, faithful: bool) -> Candidate:
    agree = 398 if faithful else 380
    metrics = Metrics(400, agree / 4, None, None, {"y": 0.99}, {"y": 30.0}, {"y": 0.1}, agreement=wilson(agree, 400))
    return Candidate(Recipe(name), b"model", metrics, () if faithful else ("agreement too low",), None,
                     host_latency_ms=ms, kernel=kernel)


def test_a_faithful_16x8_model_43x_slower_than_int8_does_not_ship() -> None:
    """The issue's case: int8 at 0.24 ms misses fidelity, 16x8 at 11.4 ms meets it."""
    rpi4 = load_profile("rpi4")
    judged = judge_speed([_candidate("int8 per-channel", "xnnpack-int8", 0.24, False),
                          _candidate("16x8", "reference-int16", 11.4, True)], rpi4, None)  # type: ignore[arg-type]
    slow = judged[1]
    assert slow.faithful and not slow.ok and slow.slowdown == pytest.approx(47.5)
    assert "47.5x the fastest full-int8 candidate 'int8 per-channel'" in slow.too_slow
    assert pick(judged).recipe.name == "int8 per-channel"  # written, not deployable, never the slow one
    result = SearchResult(tuple(judged), pick(judged), 2, judged[1], judged[0])
    assert "fastest faithful candidate '16x8' (reference-int16) is 47.5x" in result.reasons[-1]
    assert "most faithful fast candidate 'int8 per-channel'" in result.reasons[-1]


def test_no_speed_limit_when_the_profile_has_none() -> None:
    free = load_profile("rpi4").model_copy(update={"fidelity": load_profile("rpi4").fidelity.model_copy(
        update={"max_slowdown": None})})
    judged = judge_speed([_candidate("int8", "xnnpack-int8", 0.24, False),
                          _candidate("16x8", "reference-int16", 11.4, True)], free, None)  # type: ignore[arg-type]
    assert judged[1].ok and pick(judged).recipe.name == "16x8"


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from scripts.sample_models import face_crops, write_samples

    folder = tmp_path_factory.mktemp("faces")
    x = face_crops(2400)  # it repeats some crops exactly; distinct ones only, as the benchmark draws them
    _, first = np.unique(x.reshape(len(x), -1), axis=0, return_index=True)
    x = x[np.sort(first)]
    x = x[np.random.default_rng(1).permutation(len(x))][:1500]
    return write_samples(folder / "cal.npz", x[:300]), write_samples(folder / "eval.npz", x[300:])


@pytest.mark.slow
@pytest.mark.timeout(900)  # the whole search, learned rounding and distillation included: ~200 s on a quiet host
def test_real_mini_xception_exits_3_naming_the_fastest_faithful_and_the_most_faithful_fast(
        faces, tmp_path: Path, capsys) -> None:
    """A model no one here wrote (fer's .hdf5): 16x8 is faithful but ~100x slower than int8 on the
    host, so nothing within max_slowdown meets the target; exit 3, both facts in the report."""
    from converter.cli import main

    data = yaml.safe_load((profile_dir() / "rpi4.yaml").read_text())
    data["name"] = "rpi4-no-fallback"
    data["fidelity"]["min_top1_agreement_pct"] = 96.0  # 16x8: 97.67 % [96.65, 98.38] on these 1200 crops; best int8 95.08 % [93.71, 96.17]
    data["quantization"]["allow_float_fallback"] = False
    profile = tmp_path / "p.yaml"
    profile.write_text(yaml.safe_dump(data))
    cal, ev = faces
    code = main([str(FER), "--profile", str(profile), "--calibration", str(cal), "--eval", str(ev),
                 "--input-range", "-1,1", "--out", str(tmp_path / "art"), "--quiet"])
    assert code == 3
    err = capsys.readouterr().err
    assert "fastest faithful candidate '16x8 (int16 activations)' (reference-int16)" in err
    report = json.loads((tmp_path / "art" / "report.json").read_text())
    by_name = {r["name"]: r for r in report["recipes"]}
    slow = by_name["16x8 (int16 activations)"]
    assert slow["faithful"] and slow["slowdown"] > 1.5 and slow["kernel"] == "reference-int16"
    chosen = report["chosen"]
    assert chosen["kernel"] == "xnnpack-int8" and chosen["slowdown"] <= 1.5
    assert report["fidelity"]["fastest_faithful"] == "16x8 (int16 activations)"
    assert report["fidelity"]["most_faithful_fast"] == chosen["name"]
    for r in report["recipes"]:  # per recipe: size, fidelity with its interval, latency, kernel class
        assert r["size"] and r["metrics"]["top1_agreement_interval"]["low"] <= r["metrics"]["top1_agreement_pct"]
        assert r["host_latency_ms"] > 0 and r["kernel"]
    md = (tmp_path / "art" / "report.md").read_text()
    assert "Speed and fidelity could not be had together" in md and "reference-int16" in md


def _missing(name: str, size: int, lost: list[int], n: int = 360) -> Candidate:
    """A fast candidate that misses the target, disagreeing with the float model on samples ``lost``."""
    agrees = np.ones(n, bool)
    agrees[lost] = False
    metrics = Metrics(n, 100 * agrees.mean(), None, None, {"y": 0.95}, {"y": 20.0}, {"y": 0.1},
                      agreement=wilson(int(agrees.sum()), n), agrees=agrees)
    return Candidate(Recipe(name), b"m" * size, metrics, ("agreement too low",), None, host_latency_ms=0.2,
                     kernel="xnnpack-int8")


def test_when_nothing_meets_the_target_one_sample_does_not_buy_a_larger_model() -> None:
    """The bench's MobileNetV2 at 50 % sparsity wrote learned rounding (597.6 KB, 332/360) over
    per-tensor (433.5 KB, 331/360): the same samples cannot tell them apart, so the smaller is written."""
    rounding = _missing("int8 per-channel + learned rounding", 597, list(range(28)))
    per_tensor = _missing("int8 per-tensor + equalization", 433, list(range(28)) + [40])
    assert rounding.rank > per_tensor.rank
    assert pick([rounding, per_tensor]).recipe.name == "int8 per-tensor + equalization"
    assert most_faithful([rounding, per_tensor]) is per_tensor


def test_when_nothing_meets_the_target_a_clearly_more_faithful_larger_model_is_written() -> None:
    faithful = _missing("int8 per-channel + mse ranges", 597, list(range(20)))
    worse = _missing("int8 per-tensor + equalization", 433, list(range(20)) + list(range(100, 130)))
    assert pick([worse, faithful]).recipe.name == "int8 per-channel + mse ranges"
