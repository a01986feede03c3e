"""convert(): the artifact is complete, valid, signed and honest; failures leave nothing behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from converter import convert
from converter.tflite_inspect import make_interpreter
from edgefleet.errors import ConfigError, ModelError
from edgefleet.manifest import load_manifest, sha256_file
from edgefleet.profiles import profile_dir
from edgefleet.quant import QuantParams, dequantize, top1
from edgefleet.signing import load_public_key, verify_manifest


def test_artifact_manifest_validates_matches_model_and_signature_verifies(digits_result, signing_keys) -> None:
    out = digits_result.out_dir
    manifest, raw, signature = load_manifest(out)
    assert manifest.deployable and digits_result.exit_code == 0
    assert manifest.name == "digits" and manifest.version == "1.2" and manifest.profile == "x86-dev"
    assert manifest.model.sha256 == sha256_file(out / "model.tflite")
    assert manifest.model.size == (out / "model.tflite").stat().st_size
    assert manifest.source.format == "keras" and len(manifest.source.sha256) == 64
    assert [(t.name, t.shape, t.dtype) for t in manifest.inputs] == [("image", [1, 8, 8, 1], "int8")]
    assert [(t.name, t.shape, t.dtype) for t in manifest.outputs] == [("probs", [1, 10], "int8")]
    assert manifest.inputs[0].quantization.scale[0] > 0
    assert manifest.preprocessing.layout == "NHWC"
    assert verify_manifest(raw, signature, [load_public_key(signing_keys[1])])
    assert manifest.baseline.class_histogram and abs(sum(manifest.baseline.class_histogram) - 1) < 1e-6
    assert 0.5 < manifest.baseline.mean_confidence <= 1
    assert manifest.fidelity["top1_agreement_pct"] >= 98


def test_golden_samples_replay_on_the_artifact_within_atol(digits_result) -> None:
    manifest, _, _ = load_manifest(digits_result.out_dir)
    assert 3 <= len(manifest.golden.samples) <= 8 and manifest.golden.atol > 0
    runner = make_interpreter((digits_result.out_dir / "model.tflite").read_bytes()).get_signature_runner()
    params = QuantParams.from_detail(runner.get_output_details()["probs"])
    for inputs, expected in manifest.golden_arrays():
        got = dequantize(runner(**inputs)["probs"], params)
        assert np.max(np.abs(got.ravel() - expected["probs"])) <= manifest.golden.atol
        assert top1(got.ravel()) == top1(expected["probs"])


def test_golden_outputs_are_bit_identical_to_what_the_agent_engine_returns(digits_result) -> None:
    """One dequantizer (edgefleet.quant) on both sides: a device with this runtime reproduces the
    golden outputs exactly, so any difference on a device is the device's, not a formula's."""
    from agent import Engine

    manifest, _, _ = load_manifest(digits_result.out_dir)
    engine = Engine(digits_result.out_dir, profile="x86-dev", autotune=False)
    try:
        for inputs, expected in manifest.golden_arrays():
            got = engine.infer(inputs)
            assert got.dtype == np.float32 and expected["probs"].dtype == np.float32
            np.testing.assert_array_equal(got.ravel(), expected["probs"])
    finally:
        engine.close()


def test_report_has_float_vs_int8_table_recipes_and_host_labelled_latency(digits_result) -> None:
    out = digits_result.out_dir
    report = json.loads((out / "report.json").read_text())
    assert report["chosen"]["size"] <= 0.3 * report["float"]["size"]
    assert report["recipes"][0]["name"] == "int8 per-channel"
    assert report["chosen"]["host_latency_ms"] > 0
    md = (out / "report.md").read_text()
    assert "| size |" in md and "host latency (this machine" in md and "## Recipes tried" in md


@pytest.mark.slow  # the whole search, learned rounding and distillation included: 30 s
def test_strict_profile_tries_remedies_and_cli_exits_3_with_a_not_deployable_artifact(digits, tmp_path: Path,
                                                                                     capsys) -> None:
    from converter.cli import main

    data = yaml.safe_load((profile_dir() / "x86-dev.yaml").read_text())
    data.update(name="x86-strict", fidelity={"max_top1_drop_pct": 0, "min_top1_agreement_pct": 100, "min_cosine": 1.0})
    strict = tmp_path / "strict.yaml"
    strict.write_text(yaml.safe_dump(data))
    code = main([str(digits.keras_path), "--profile", str(strict), "--calibration", str(digits.calibration),
                 "--eval", str(digits.evaluation), "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 3
    err = capsys.readouterr().err
    # 360/360 agreeing is not proof of 100 %: no held-out set can show that, and the report says so
    assert "NOT deployable: held-out set too small to show top-1 agreement >= 100%" in err
    assert "no held-out set can show it at this rate" in err and "cosine" in err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    names = [r["name"] for r in report["recipes"]]
    assert names[:3] == ["int8 per-channel", "int8 per-tensor + equalization", "int8 per-channel + bias correction"]
    fitted = [n for n in names if n.startswith(("int8 per-channel + learned rounding", "int8 per-channel + distillation"))]
    ranges = [n for n in names if n.endswith(("percentile ranges", "mse ranges")) and n not in fitted]
    assert ranges and names.index("16x8 (int16 activations)") > max(names.index(n) for n in ranges)
    # weights fitted to the int8 grid: after the range methods, learned rounding before distillation, before 16x8
    assert [n.split(" + ")[1] for n in fitted] == ["learned rounding", "distillation"]
    assert max(names.index(n) for n in ranges) < names.index(fitted[0]) < names.index(fitted[1]) \
        < names.index("16x8 (int16 activations)")
    assert set(report["weight_fitting"]) == {"learned_rounding", "distillation"}
    assert any("float fallback" in n for n in names)
    assert all(r["size"] and r["metrics"] for r in report["recipes"])
    manifest, _, _ = load_manifest(tmp_path / "out")
    assert manifest.deployable is False and manifest.fidelity["misses"]
    assert (tmp_path / "out" / "report.md").is_file()


def test_saved_model_with_two_inputs_and_outputs_converts_with_batch_1(two_output_saved_model, tmp_path: Path) -> None:
    model_dir, samples = two_output_saved_model
    result = convert(model_dir, "rpi4", samples, tmp_path / "out", latency_runs=3)
    m = result.manifest
    assert [t.name for t in m.inputs] == ["hint", "pixels"] and m.inputs[1].shape == [1, 64]
    assert len(m.outputs) == 2 and {t.shape[-1] for t in m.outputs} == {1, 10}
    assert m.source.format == "saved_model" and set(m.golden.samples[0].outputs) == {t.name for t in m.outputs}


@pytest.mark.slow  # prunes, fine-tunes and converts twice: 11 s
def test_pruned_h5_conversion_is_smaller_and_reports_pruning(digits, tmp_path: Path) -> None:
    result = convert(digits.h5_path, "rpi4", digits.calibration, tmp_path / "out", eval_data=digits.evaluation,
                     prune_channels=0.3, sparsity=0.5, finetune_epochs=2, latency_runs=3)
    assert result.manifest.source.format == "h5"
    pruning = result.report["pruning"]
    assert pruning["params_after"] < 0.6 * pruning["params_before"] and pruning["sparsity"] >= 0.49
    assert pruning["allocation"] == "cost" and 0.2 <= pruning["channels_removed"] <= 0.4
    assert pruning["macs_after"] < 0.7 * pruning["macs_before"]
    assert result.report["chosen"]["gzip_size"] < 0.5 * result.report["float"]["gzip_size"]


def test_smaller_per_tensor_recipe_ships_when_it_also_meets_the_target(digits_result) -> None:
    report = digits_result.report
    by_name = {r["name"]: r for r in report["recipes"]}
    per_channel, per_tensor = by_name["int8 per-channel"], by_name["int8 per-tensor + equalization"]
    assert not per_channel["misses"] and not per_tensor["misses"]
    assert report["chosen"]["name"] == "int8 per-tensor + equalization" and per_tensor["size"] < per_channel["size"]
    assert report["equalization"]["pairs"] >= 1 and "Cross-layer equalization" in (
        digits_result.out_dir / "report.md").read_text()


def test_report_breaks_the_model_size_down_into_weights_quantization_params_and_graph(digits_result) -> None:
    chosen, float_ = digits_result.report["chosen"], digits_result.report["float"]
    b = chosen["size_breakdown"]
    assert b["weights"] + b["bias"] + b["quant_scales"] + b["quant_zero_points"] + b["graph"] == b["total"] == chosen["size"]
    # per-tensor: no per-channel axes; one float32 scale and one int64 zero point (the schema's type) per tensor
    assert b["per_channel_axes"] == 0 and b["quant_zero_points"] == 2 * b["quant_scales"] > 0
    assert float_["size_breakdown"]["quant_scales"] == 0 and float_["size_breakdown"]["weights"] > 3.5 * b["weights"]
    assert b["gzip_total"] == chosen["gzip_size"]
    assert "quantization zero points (int64)" in (digits_result.out_dir / "report.md").read_text()


def test_out_dir_that_is_not_an_artifact_is_refused_and_left_untouched(digits, tmp_path: Path) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a previous artifact"):
        convert(digits.keras_path, "x86-dev", digits.calibration, out)
    assert (out / "thesis.txt").read_text() == "keep me"


def test_failed_conversion_leaves_no_partial_artifact_or_temp_dir(digits, tmp_path: Path) -> None:
    bad = tmp_path / "nan.npy"
    x = digits.x[:20].copy()
    x[3, 0, 0, 0] = np.nan
    np.save(bad, x)
    with pytest.raises(ConfigError, match="NaN"):
        convert(digits.keras_path, "x86-dev", bad, tmp_path / "out")
    with pytest.raises(ModelError, match="unsupported model format"):
        convert(bad, "x86-dev", bad, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.npy"]


def test_previous_artifact_is_replaced_whole(digits_result, digits, tmp_path: Path) -> None:
    out = tmp_path / "art"
    shutil.copytree(digits_result.out_dir, out)  # a signed artifact from an earlier run
    assert (out / "manifest.json.sig").exists() and load_manifest(out)[0].version == "1.2"
    second = convert(digits.keras_path, "x86-dev", digits.calibration, out, version="2", latency_runs=3)
    assert load_manifest(out)[0].version == "2" == second.manifest.version
    assert not (out / "manifest.json.sig").exists(), "the unsigned run leaves no stale signature behind"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_artifact_passes_the_agent_sandbox_and_runs_in_the_engine(digits_result, digits) -> None:
    """The contract end to end: what the converter writes, the agent's own validation accepts."""
    from agent import Engine
    from agent.validation import validate_model

    report = validate_model(digits_result.out_dir, profile="x86-dev", timeout_s=60)
    assert report.ok, report.reason
    engine = Engine(digits_result.out_dir, profile="x86-dev")
    try:
        held_out = digits.x[digits.n_train:digits.n_train + 20]
        confident = int(digits.model.predict(held_out, verbose=0).max(axis=1).argmax())
        scores = engine.infer(held_out[confident:confident + 1])
        expected = int(digits.model.predict(held_out[confident:confident + 1], verbose=0).argmax())
        assert scores.shape == (1, 10) and int(scores.argmax()) == expected
    finally:
        engine.close()


def test_coral_profile_gets_uint8_io_full_integer_and_a_pending_compile_note(digits, tmp_path: Path) -> None:
    result = convert(digits.keras_path, "coral-usb", digits.calibration, tmp_path / "out",
                     eval_data=digits.evaluation, latency_runs=3)
    assert result.deployable, result.reasons
    assert [t.dtype for t in result.manifest.inputs + result.manifest.outputs] == ["uint8", "uint8"]
    assert result.report["chosen"]["full_integer"] and result.report["edgetpu"]["static_ok"]
    assert "edgetpu_compiler" in (tmp_path / "out" / "report.md").read_text()


def test_calibration_samples_that_are_also_evaluation_samples_are_dropped_from_calibration(digits,
                                                                                          tmp_path: Path) -> None:
    from scripts.sample_models import write_samples

    n = digits.n_train
    both = write_samples(tmp_path / "both.npz", digits.x[n - 100:], digits.y[n - 100:])  # 100 train + all held out
    result = convert(digits.keras_path, "x86-dev", both, tmp_path / "out", eval_data=digits.evaluation, latency_runs=2)
    assert result.report["calibration_samples"] == 100
    assert f"{len(digits.x) - n} calibration samples identical to evaluation samples dropped" in \
        result.report["eval_source"]
    with pytest.raises(ConfigError, match="every calibration sample is also an evaluation sample"):
        convert(digits.keras_path, "x86-dev", digits.evaluation, tmp_path / "o2", eval_data=digits.evaluation)


def test_too_few_samples_to_hold_any_out_is_refused_not_evaluated_on_the_calibration_set(digits,
                                                                                        tmp_path: Path) -> None:
    few = tmp_path / "few.npy"
    np.save(few, digits.x[:9])
    with pytest.raises(ConfigError, match="9 samples, expected at least 10 to hold some out"):
        convert(digits.keras_path, "x86-dev", few, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["few.npy"]


def test_fidelity_block_has_intervals_worst_class_calibration_error_and_robustness(digits_result) -> None:
    manifest, _, _ = load_manifest(digits_result.out_dir)
    f = manifest.fidelity
    iv = f["top1_agreement_interval"]
    assert iv["trials"] == 360 and iv["low"] <= f["top1_agreement_pct"] <= iv["high"] and iv["low"] >= 96
    assert f["worst_class"]["trials"] >= 20 and f["float_ece_pct"] is not None and f["ece_pct"] is not None
    assert set(f["robustness"]) == {"noise", "brighter", "darker"}
    assert all(v["trials"] == 360 for v in f["robustness"].values())
    assert f["kernel"] == "xnnpack-int8" and f["slowdown"] <= 1.5 and f["host_threads"] >= 1
    md = (digits_result.out_dir / "report.md").read_text()
    assert "[95% interval]" in md and "worst class agreement" in md and "agreement under noise" in md
    assert "expected calibration error" in md
