"""`edge-agent infer | validate | bench`: results, exit codes and one-line errors without tracebacks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agent.cli import main

pytestmark = pytest.mark.runtime


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_infer_prints_outputs_and_top1_as_json(models, tmp_path, capsys, images):
    np.save(tmp_path / "x.npy", images[:3])
    code, out, _ = _run(capsys, "infer", "--model", str(models / "int8.tflite"), "--input",
                        str(tmp_path / "x.npy"), "--json", "--profile", "x86-dev")
    body = json.loads(out)
    assert code == 0
    assert np.asarray(body["outputs"]["output_0"]).shape == (3, 10)
    assert body["top1"] == np.argmax(body["outputs"]["output_0"], axis=-1).tolist()


def test_infer_writes_npy_and_npz_outputs(models, tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((1, 8), np.float32))
    code, _, _ = _run(capsys, "infer", "--model", str(models / "tiny.tflite"), "--input", str(tmp_path / "x.npy"),
                      "--output", str(tmp_path / "y.npy"))
    assert code == 0 and np.load(tmp_path / "y.npy").shape == (1, 4)
    np.savez(tmp_path / "ab.npz", a=np.ones((1, 4), np.float32), b=np.ones((1, 6), np.float32))
    code, _, _ = _run(capsys, "infer", "--model", str(models / "multi_io.tflite"), "--input",
                      str(tmp_path / "ab.npz"), "--output", str(tmp_path / "out.npz"))
    with np.load(tmp_path / "out.npz") as out:
        assert code == 0 and sorted(out.files) == ["prod", "sum"]


def test_infer_with_wrong_shape_is_one_error_line_and_exit_2(models, tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((1, 5), np.float32))
    code, out, err = _run(capsys, "infer", "--model", str(models / "tiny.tflite"), "--input", str(tmp_path / "x.npy"),
                          "--output", str(tmp_path / "y.npy"))
    assert code == 2 and out == ""
    assert err.startswith("error: input 'x': expected shape [1, 8]") and err.count("\n") == 1
    assert "Traceback" not in err and not (tmp_path / "y.npy").exists()


def test_infer_refuses_a_non_array_input_file(models, tmp_path, capsys):
    (tmp_path / "x.npy").write_text("not numpy")
    code, _, err = _run(capsys, "infer", "--model", str(models / "tiny.tflite"), "--input", str(tmp_path / "x.npy"))
    assert code == 2 and "not a .npy/.npz array file" in err and err.count("\n") == 1


def test_validate_exit_codes(models, tmp_path, capsys):
    code, out, _ = _run(capsys, "validate", "--model", str(models / "uint8.tflite"), "--profile", "x86-dev")
    assert code == 0 and out.startswith("ok:")
    code, _, err = _run(capsys, "validate", "--model", str(models / "custom_op.tflite"))
    assert code == 1 and "EdgefleetSecretOp" in err and err.count("\n") == 1
    (tmp_path / "cut.tflite").write_bytes((models / "int8.tflite").read_bytes()[:700])
    code, _, err = _run(capsys, "validate", "--model", str(tmp_path / "cut.tflite"))
    assert code == 1 and err.startswith("invalid:") and "Traceback" not in err


def test_bench_reports_latency_and_cache_stats(models, capsys):
    code, out, _ = _run(capsys, "bench", "--model", str(models / "int8.tflite"), "--cache", "on",
                        "--iterations", "30", "--json", "--profile", "x86-dev")
    result = json.loads(out)
    assert code == 0 and result["calls"] == 30
    assert result["cache_stats"]["exact_hits"] == 30  # the warm-up computed it once
    assert result["latency_ms"]["p50"] > 0


def test_real_process_error_output_is_one_line_without_the_runtimes_info_noise(models, tmp_path):
    import subprocess
    import sys

    np.save(tmp_path / "x.npy", np.zeros((1, 5), np.float32))
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "infer", "--model", str(models / "tiny.tflite"),
                           "--input", str(tmp_path / "x.npy")], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: input 'x'") and proc.stderr.count("\n") == 1, proc.stderr
