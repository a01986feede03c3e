"""The converter on a real MobileNetV2 (alpha 0.35, 96x96, random init, trained briefly on upscaled
digits): residual adds, depthwise convs, ReLU6 and padding, the topology users actually ship.

Training is one short epoch (the benchmark trains longer and measures the targets); these tests
check what must hold for any such model: every recipe converts to full integer, equalization finds
MobileNet's layer pairs without changing the float function, per-tensor weights make the file
far smaller, and channel pruning keeps residual branches consistent and cuts the compute.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from converter import convert
from converter._tf import keras
from converter.equalize import equalize
from edgefleet.profiles import profile_dir
from scripts.sample_models import build_mobilenet_digits, digits_data, write_samples

# A real MobileNetV2 trained and converted several ways: minutes on two cores (`make test-slow`).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, np.ndarray]:
    folder = tmp_path_factory.mktemp("mobilenet")
    x, y = digits_data(size=96, channels=3)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    keras.utils.set_random_seed(0)
    model = build_mobilenet_digits()
    for layer in model.layers:  # a few dozen steps cannot move 0.999-momentum statistics
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.8
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss="sparse_categorical_crossentropy")
    model.fit(x[:640], y[:640], epochs=1, batch_size=32, verbose=0)
    model.save(folder / "mobilenet.keras")
    write_samples(folder / "cal.npz", x[:100], y[:100])
    write_samples(folder / "eval.npz", x[1500:1600], y[1500:1600])
    return folder / "mobilenet.keras", folder / "cal.npz", folder / "eval.npz", x[:64]


def _lenient_profile(tmp_path: Path, per_channel: bool = True) -> Path:
    """x86-dev with a target any int8 recipe meets: these tests check structure, the benchmark fidelity."""
    data = yaml.safe_load((profile_dir() / "x86-dev.yaml").read_text())
    data.update(name="x86-lenient", fidelity={"max_top1_drop_pct": 100, "min_top1_agreement_pct": 0, "min_cosine": 0})
    data["quantization"]["per_channel"] = per_channel
    path = tmp_path / "lenient.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_equalization_finds_every_mobilenet_pair_and_keeps_the_float_function(mobilenet) -> None:
    model_path, _, _, x = mobilenet
    model = keras.models.load_model(model_path)
    before = model.predict(x, verbose=0)
    summary = equalize(model, [x])
    assert summary.pairs == 35  # (expand, depthwise) and (depthwise, project) in 17 blocks, Conv_1 -> classifier
    np.testing.assert_allclose(model.predict(x, verbose=0), before, atol=1e-4)


def test_mobilenet_converts_to_full_integer_and_per_tensor_weights_ship_smaller(mobilenet, tmp_path: Path) -> None:
    model_path, cal, ev, _ = mobilenet
    result = convert(model_path, _lenient_profile(tmp_path), cal, tmp_path / "art", eval_data=ev, latency_runs=2)
    recipes = {r["name"]: r for r in result.report["recipes"]}
    per_channel, per_tensor = recipes["int8 per-channel"], recipes["int8 per-tensor + equalization"]
    assert per_channel["full_integer"] and per_tensor["full_integer"]
    assert result.report["chosen"]["name"] == "int8 per-tensor + equalization"
    float_size = result.report["float"]["size"]
    assert per_tensor["size"] < 0.28 * float_size < per_channel["size"]  # 166 KB of per-channel parameters
    assert result.report["equalization"]["bias_corrected"] >= 50
    assert result.manifest.outputs[0].shape == [1, 10] and (tmp_path / "art" / "model.tflite").stat().st_size == \
        per_tensor["size"]


def test_mobilenet_channel_pruning_keeps_residual_branches_consistent_and_cuts_the_compute(mobilenet,
                                                                                           tmp_path: Path) -> None:
    model_path, cal, ev, _ = mobilenet
    # a per-tensor profile: its baseline is per-tensor + equalization, on the pruned student
    result = convert(model_path, _lenient_profile(tmp_path, per_channel=False), cal, tmp_path / "art", eval_data=ev,
                     prune_channels=0.3, finetune_epochs=1, latency_runs=2)
    pruning = result.report["pruning"]
    assert 0.2 <= pruning["channels_removed"] <= 0.4
    assert pruning["macs_after"] < 0.75 * pruning["macs_before"]
    assert pruning["params_after"] < pruning["params_before"]
    # a residual Add whose branches were pruned differently would not even convert
    assert [(r["name"], r["full_integer"], r["error"]) for r in result.report["recipes"]] == [
        ("int8 per-tensor + equalization", True, None)]
    assert result.report["equalization"]["pairs"] == 35  # the pruned student keeps MobileNet's topology
    assert result.manifest.outputs[0].shape == [1, 10]
