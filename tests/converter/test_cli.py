"""edge-convert on the command line: one error line and exit 2 for bad input, JSON summary on success."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from converter.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "converter.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=240, check=False)


def test_cli_end_to_end_h5_signed_json_summary_and_no_tensorflow_noise(digits, signing_keys, tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_text("".join(f"digit {i}\n" for i in range(10)) + "\n")
    proc = _run(str(digits.h5_path), "--profile", "rpi4", "--calibration", str(digits.calibration),
                "--eval", str(digits.evaluation), "--sign-key", str(signing_keys[0]), "--artifact-version", "3",
                "--labels", str(tmp_path / "labels.txt"), "--expires-days", "30", "--fleet", "shops",
                "--group", "canary", "--group", "store-17",
                "--out", str(tmp_path / "art"), "--json", "--quiet")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["deployable"] and summary["signed"] and summary["version"] == "3"
    assert summary["size"] < summary["float_size"]
    assert proc.stderr.strip() == ""
    assert (tmp_path / "art" / "manifest.json.sig").is_file()
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["labels"] == [f"digit {i}" for i in range(10)]
    assert manifest["fleet"] == "shops" and manifest["groups"] == ["canary", "store-17"]
    assert manifest["expires"].endswith("Z") and manifest["expires"] > manifest["created"]


def test_keep_tensor_names_flag_ships_the_debug_names(digits, tmp_path: Path) -> None:
    from ai_edge_litert.interpreter import Interpreter

    sizes = {}
    for label, extra in (("compact", []), ("named", ["--keep-tensor-names"])):
        out = tmp_path / label
        assert main([str(digits.keras_path), "--profile", "x86-dev", "--calibration", str(digits.calibration),
                     "--eval", str(digits.evaluation), "--out", str(out), "--quiet", *extra]) == 0
        model = (out / "model.tflite").read_bytes()
        sizes[label] = len(model)
        names = [t["name"] for t in Interpreter(model_content=model).get_tensor_details()]
        assert all(names) if label == "named" else names.count("") > len(names) / 2
    assert sizes["compact"] < sizes["named"]


def test_cli_bad_model_is_one_error_line_exit_2_in_a_real_process(tmp_path: Path) -> None:
    proc = _run(str(tmp_path / "missing.keras"), "--profile", "rpi4", "--calibration", "x.npz",
                "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing.keras'}: model not found"]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("case", ["bad_profile", "bad_range", "bad_fraction", "missing_out", "nan_samples",
                                  "shape_mismatch", "not_artifact_out", "unknown_flag"])
def test_cli_bad_input_prints_one_error_line_and_exits_2(case: str, digits, tmp_path: Path, capsys) -> None:
    nan = tmp_path / "nan.npy"
    x = digits.x[:8].copy()
    x[0, 0, 0, 0] = np.nan
    np.save(nan, x)
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((4, 10, 10, 1), np.float32))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "other.txt").write_text("x")
    base = [str(digits.keras_path), "--profile", "x86-dev", "--calibration", str(digits.calibration),
            "--out", str(tmp_path / "out")]
    argv = {
        "bad_profile": base[:1] + ["--profile", "pi-9000"] + base[3:],
        "bad_range": base + ["--input-range", "1,0"],
        "bad_fraction": base + ["--prune-channels", "1.5"],
        "missing_out": base[:-2],
        "nan_samples": base[:3] + ["--calibration", str(nan)] + base[5:],
        "shape_mismatch": base[:3] + ["--calibration", str(wrong)] + base[5:],
        "not_artifact_out": base[:-1] + [str(taken)],
        "unknown_flag": base + ["--turbo"],
    }[case]
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ")
    assert not (tmp_path / "out").exists()


def test_list_profiles_prints_one_summary_line_per_profile(capsys) -> None:
    assert main(["--list-profiles"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("rpi4 ") for line in lines) and any("edgetpu" in line for line in lines)
