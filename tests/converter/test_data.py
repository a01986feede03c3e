"""Sample loading: every bad sample file fails early with one clear line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from converter.data import load_samples, parse_range
from converter.loading import TensorInfo
from edgefleet.errors import ConfigError

IMAGE = (TensorInfo("image", (1, 8, 8, 1), "float32"),)
TWO = (TensorInfo("a", (1, 3), "float32"), TensorInfo("b", (1, 2), "float32"))


def test_npz_x_without_channel_axis_is_accepted_with_labels(tmp_path: Path) -> None:
    np.savez(tmp_path / "s.npz", x=np.random.rand(5, 8, 8), y=np.arange(5))
    s = load_samples(tmp_path / "s.npz", IMAGE)
    assert s.inputs["image"].shape == (5, 8, 8, 1) and s.inputs["image"].dtype == np.float32
    assert list(s.labels) == [0, 1, 2, 3, 4]


def test_npz_with_one_array_per_named_input(tmp_path: Path) -> None:
    np.savez(tmp_path / "s.npz", a=np.ones((4, 3)), b=np.zeros((4, 2)))
    s = load_samples(tmp_path / "s.npz", TWO)
    assert len(s) == 4 and s.labels is None


def test_npz_missing_an_input_array_names_it(tmp_path: Path) -> None:
    np.savez(tmp_path / "s.npz", a=np.ones((4, 3)))
    with pytest.raises(ConfigError, match="no array named 'b'"):
        load_samples(tmp_path / "s.npz", TWO)


def test_wrong_shape_says_expected_and_got(tmp_path: Path) -> None:
    np.save(tmp_path / "s.npy", np.zeros((3, 28, 28, 1), np.float32))
    with pytest.raises(ConfigError, match=r"shape \(3, 28, 28, 1\), expected \(N, 8, 8, 1\)"):
        load_samples(tmp_path / "s.npy", IMAGE)


def test_nan_or_inf_in_samples_is_rejected(tmp_path: Path) -> None:
    x = np.zeros((3, 8, 8, 1), np.float32)
    x[2, 1, 1, 0] = np.inf
    np.save(tmp_path / "s.npy", x)
    with pytest.raises(ConfigError, match="NaN/Inf.*sample 2"):
        load_samples(tmp_path / "s.npy", IMAGE)


def test_non_numeric_samples_are_rejected(tmp_path: Path) -> None:
    np.save(tmp_path / "s.npy", np.array([["a"] * 8] * 8))
    with pytest.raises(ConfigError, match="not numeric"):
        load_samples(tmp_path / "s.npy", IMAGE)


def test_samples_outside_declared_input_range_are_rejected(tmp_path: Path) -> None:
    np.save(tmp_path / "s.npy", np.full((2, 8, 8, 1), 255.0, np.float32))
    with pytest.raises(ConfigError, match="outside --input-range 0,1"):
        load_samples(tmp_path / "s.npy", IMAGE, (0.0, 1.0))


def test_unknown_format_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "s.csv").write_text("1,2")
    with pytest.raises(ConfigError, match="unsupported sample format"):
        load_samples(tmp_path / "s.csv", IMAGE)
    with pytest.raises(ConfigError, match="not found"):
        load_samples(tmp_path / "nope.npz", IMAGE)


def test_image_folder_is_resized_scaled_to_range_and_labelled_by_subfolder(tmp_path: Path) -> None:
    for label, value in (("cat", 0), ("dog", 255)):
        (tmp_path / label).mkdir()
        Image.fromarray(np.full((20, 30, 3), value, np.uint8)).save(tmp_path / label / "a.png")
    s = load_samples(tmp_path, IMAGE, (-1.0, 1.0))
    assert s.inputs["image"].shape == (2, 8, 8, 1)
    assert np.allclose(s.inputs["image"][0], -1.0) and np.allclose(s.inputs["image"][1], 1.0)
    assert list(s.labels) == [0, 1]


def test_input_range_flag_parsing() -> None:
    assert parse_range("-1,1") == (-1.0, 1.0)
    for bad in ("1", "1,0", "a,b", "0,inf"):
        with pytest.raises(ConfigError):
            parse_range(bad)


def test_one_picture_repeated_in_the_evaluation_set_counts_once_and_is_never_calibrated_on() -> None:
    """fer's bench set held one constant crop 412 times: 83 copies calibrated the model and 330 were
    judged, so one flipped prediction read as 28 points (66 % agreement inside the search, where the
    copies were dropped from calibration, against 93.7 % in the step table, where they were not)."""
    from converter.data import SampleSet, held_out

    rng = np.random.default_rng(0)
    distinct = rng.random((20, 8, 8, 1)).astype(np.float32)
    constant = np.ones((1, 8, 8, 1), np.float32)
    cal = SampleSet({"image": np.concatenate([distinct[:10], np.repeat(constant, 3, axis=0)])}, None, "cal")
    ev = SampleSet({"image": np.concatenate([distinct[10:], np.repeat(constant, 12, axis=0)])}, None, "ev")
    kept, judged, dropped = held_out(cal, ev)
    assert len(judged) == 11 and len(kept) == 10  # the constant picture: once in evaluation, never in calibration
    assert not set(kept.fingerprints()) & set(judged.fingerprints())
    assert dropped == "3 calibration samples identical to evaluation samples dropped; 11 duplicate evaluation samples dropped"
    again = held_out(kept, judged)
    assert len(again[0]) == 10 and len(again[1]) == 11 and again[2] == ""
