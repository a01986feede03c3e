"""Telemetry arithmetic: windows, percentiles, drift vs the manifest baseline, temperature."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agent.telemetry import Metrics, SystemStats, drift_report, read_temperature_c, summarize_output
from edgefleet.manifest import Baseline


def test_window_counts_and_percentiles_then_resets() -> None:
    m = Metrics()
    for i in range(100):
        m.record((i + 1) / 1000.0, np.array([0.9, 0.1]) if i % 2 else np.array([0.1, 0.9]))
    m.record(0.5, None, error=True)
    w = m.take_window()
    assert w.inferences == 100 and w.errors == 1
    assert 49 <= w.p50_ms <= 52 and 94 <= w.p95_ms <= 96 and w.p99_ms <= 100
    again = m.take_window()
    assert again.inferences == 0 and again.p50_ms is None
    assert m.total_inferences == 100
    assert m.drift(None)["samples"] == 100 and m.drift(None)["mean_confidence"] == 0.9


def test_count_stays_exact_when_the_window_sample_is_capped() -> None:
    m = Metrics(max_window=10, drift_per_window=4)
    for _ in range(50):
        m.record(0.001, np.array([0.2, 0.8]))
    assert m.take_window().inferences == 50
    assert m.drift(None)["samples"] == 4


def test_drift_is_zero_for_the_baseline_distribution_and_one_for_a_disjoint_one() -> None:
    baseline = Baseline(class_histogram=[0.5, 0.5, 0.0], mean_confidence=0.8)
    same = drift_report([(0, 0.8), (1, 0.8)] * 50, baseline)
    assert same["tvd"] == 0.0 and same["confidence_delta"] == 0.0
    shifted = drift_report([(2, 0.5)] * 10, baseline)
    assert shifted["tvd"] == 1.0 and shifted["confidence_delta"] == -0.3
    assert drift_report([(0, 0.9)], None)["tvd"] is None
    assert drift_report([], baseline)["samples"] == 0


def test_summarize_output_reads_top1_of_classifiers_only() -> None:
    assert summarize_output(np.array([[0.1, 0.7, 0.2]], dtype=np.float32)) == (1, np.float32(0.7).item())
    assert summarize_output({"scores": np.array([0.0, 1.0])}) == (1, 1.0)
    assert summarize_output(np.array([3.0])) == (None, None)


def test_temperature_comes_from_the_first_readable_thermal_zone(tmp_path: Path) -> None:
    # A fake /sys/class/thermal: this machine has no Pi sensor to read.
    assert read_temperature_c(tmp_path) is None
    (tmp_path / "thermal_zone0").mkdir()
    (tmp_path / "thermal_zone0" / "temp").write_text("garbage\n")
    (tmp_path / "thermal_zone1").mkdir()
    (tmp_path / "thermal_zone1" / "temp").write_text("48312\n")
    assert read_temperature_c(tmp_path) == 48.3


def test_system_stats_report_units(tmp_path: Path) -> None:
    sample = SystemStats(tmp_path, thermal_root=tmp_path).sample()
    assert sample["rss_mb"] > 10 and sample["disk_free_mb"] > 0 and sample["temp_c"] is None
    assert sample["cpu_percent"] >= 0
