"""Cross-layer equalization: the float function stays the same, per-tensor int8 gets closer to it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from converter._tf import keras
from converter.data import SampleSet
from converter.equalize import correct_bias, equalize
from converter.fidelity import compare, run_model
from converter.loading import export_keras
from converter.quantize import Recipe, convert_float, quantize


def _mobile_block(seed: int = 0) -> keras.Model:
    """conv-BN-ReLU6 -> depthwise-BN-ReLU6 -> 1x1-BN -> pool -> dense, with batch-norm scales that
    spread the folded depthwise channels over two orders of magnitude, as in trained MobileNets,
    and a projection that gives every channel a like share of the output (small folded weights,
    big downstream weights: exactly what one per-tensor scale gets wrong)."""
    keras.utils.set_random_seed(seed)
    L = keras.layers
    x = inp = keras.Input((12, 12, 3), name="image")
    x = L.Conv2D(16, 3, padding="same", use_bias=False, name="expand")(x)
    x = L.BatchNormalization(name="expand_bn")(x)
    x = L.ReLU(6.0, name="expand_relu")(x)
    x = L.DepthwiseConv2D(3, padding="same", use_bias=False, name="depthwise")(x)
    x = L.BatchNormalization(name="depthwise_bn")(x)
    x = L.ReLU(6.0, name="depthwise_relu")(x)
    x = L.Conv2D(8, 1, use_bias=False, name="project")(x)
    x = L.BatchNormalization(name="project_bn")(x)
    x = L.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, L.Dense(10, name="logits")(x))
    rng = np.random.default_rng(seed)
    for name in ("expand_bn", "depthwise_bn"):
        bn = model.get_layer(name)
        bn.gamma.assign(np.exp(rng.uniform(np.log(0.02), np.log(2.0), 16)).astype(np.float32))
        bn.beta.assign(rng.uniform(0.0, 0.3, 16).astype(np.float32))
    gamma = np.asarray(model.get_layer("depthwise_bn").gamma)
    project = model.get_layer("project")
    project.kernel.assign((np.asarray(project.kernel) / gamma[None, None, :, None] * gamma.mean()).astype(np.float32))
    return model


@pytest.fixture(scope="module")
def samples() -> np.ndarray:
    return np.random.default_rng(1).uniform(0, 1, (160, 12, 12, 3)).astype(np.float32)


def test_equalization_keeps_the_float_function_and_rescales_the_channels(samples: np.ndarray) -> None:
    model = _mobile_block()
    before = model.predict(samples, verbose=0)
    kernel_before = np.asarray(model.get_layer("depthwise").kernel).copy()
    summary = equalize(model, [samples[:100]])
    assert (summary.pairs, summary.channels) == (2, 32)  # expand->depthwise, depthwise->project (project_bn is linear)
    np.testing.assert_allclose(model.predict(samples, verbose=0), before, atol=1e-5)  # held-out samples too
    assert not np.allclose(np.asarray(model.get_layer("depthwise").kernel), kernel_before)


def test_channel_that_reaches_the_relu6_cap_is_left_alone(samples: np.ndarray) -> None:
    model = _mobile_block()
    bn = model.get_layer("expand_bn")
    beta = np.asarray(bn.beta).copy()
    beta[3] = 9.0  # channel 3 sits above the cap of 6 on every input: rescaling it would move the clip
    bn.beta.assign(beta)
    gamma_before = np.asarray(bn.gamma).copy()
    before = model.predict(samples, verbose=0)
    summary = equalize(model, [samples[:100]])
    assert summary.pinned >= 1
    assert np.asarray(bn.gamma)[3] == gamma_before[3] and np.asarray(bn.beta)[3] == 9.0
    np.testing.assert_allclose(model.predict(samples, verbose=0), before, atol=1e-5)


def test_per_tensor_int8_of_the_equalized_model_is_closer_to_float(samples: np.ndarray, tmp_path: Path) -> None:
    cal = SampleSet({"image": samples[:100]}, None, "cal")
    ev = SampleSet({"image": samples[100:]}, None, "eval")
    plain, equalized = _mobile_block(), _mobile_block()
    equalize(equalized, [samples[:100]])
    names = (["image"], ["logits"])
    export_keras(plain, tmp_path / "plain", names)
    export_keras(equalized, tmp_path / "equalized", names)
    reference = run_model(convert_float(tmp_path / "plain"), ev)
    snr = {}
    for label in ("plain", "equalized"):
        model = quantize(tmp_path / label, Recipe("pt", per_channel=False), cal)
        snr[label] = compare(reference, run_model(model, ev), None).snr_db["logits"]
    assert snr["equalized"] > snr["plain"] + 3  # dB: per-tensor scales stop crushing the small channels


def test_bias_correction_removes_the_mean_error_of_per_tensor_weights(samples: np.ndarray, tmp_path: Path) -> None:
    cal = SampleSet({"image": samples[:100]}, None, "cal")
    ev = SampleSet({"image": samples[100:]}, None, "eval")
    names = (["image"], ["logits"])
    original, corrected = _mobile_block(), _mobile_block()
    assert correct_bias(corrected, [samples[:100]]) == 4  # expand, depthwise, project (via BN) and the dense bias
    export_keras(original, tmp_path / "original", names)
    export_keras(corrected, tmp_path / "corrected", names)
    reference = run_model(convert_float(tmp_path / "original"), ev)["logits"]
    bias = {}
    for label in ("original", "corrected"):
        model = quantize(tmp_path / label, Recipe("pt", per_channel=False), cal)
        bias[label] = float(np.abs((run_model(model, ev)["logits"] - reference).mean(axis=0)).mean())
    assert bias["corrected"] < 0.5 * bias["original"]  # the systematic part of the error, on held-out samples
