"""The /metrics page: Prometheus conventions, parsed by prometheus_client's own parser (and
``promtool check metrics`` when it is installed), over the service's one Metrics."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.service.reporting import metrics_text
from agent.telemetry import LATENCY_BUCKETS_S, LatencyHistogram, Metrics, SystemStats
from edgefleet.manifest import Baseline

OUT = np.asarray([[0.1, 0.7, 0.2]], np.float32)


def fake_service(tmp_path: Path, model: dict[str, str] | None) -> Any:
    """The parts of AgentService that reporting reads, with the real Metrics and SystemStats."""
    manifest = SimpleNamespace(baseline=Baseline(class_histogram=[0.2, 0.6, 0.2], mean_confidence=0.6))
    host = SimpleNamespace(manifest=manifest, stats=lambda: {"engine": {"cache": {"hit_rate": 0.25}}})
    return SimpleNamespace(
        metrics=Metrics(), system=SystemStats(tmp_path), host=host, model_info=lambda: model,
        cfg=SimpleNamespace(device_id="pi-7", group="lab"), profile=SimpleNamespace(name="x86-dev"),
        outbox=SimpleNamespace(pending=lambda: 3, dropped=lambda: 1), emit_dropped=0,
        link=SimpleNamespace(connected=True), http=SimpleNamespace(evicted=2), boot=5,
        health=lambda: {"ok": True, "stuck_workers": 0})


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict[str, Any], sample: str, **labels: str) -> float:
    return next(s.value for f in fams.values() for s in f.samples
                if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))


def test_page_parses_and_follows_the_conventions(tmp_path: Path) -> None:
    svc = fake_service(tmp_path, {"name": "clf", "version": "1.4.2", "sha256": "ab" * 32})
    for latency in (0.0004, 0.003, 0.003, 0.2, 5.0):
        svc.metrics.record(latency, OUT)
    svc.metrics.record(0.0, None, error=True)
    svc.metrics.take_window()  # drift and the window percentiles are the last window's, as in telemetry
    fams = families(metrics_text(svc))
    assert fams["edgefleet_inferences"].type == "counter" and value(fams, "edgefleet_inferences_total") == 5
    assert value(fams, "edgefleet_inference_errors_total") == 1
    hist = fams["edgefleet_inference_duration_seconds"]
    assert hist.type == "histogram"
    buckets = {s.labels["le"]: s.value for s in hist.samples if s.name.endswith("_bucket")}
    assert [float(le) for le in buckets][:-1] == list(LATENCY_BUCKETS_S) and "+Inf" in buckets
    assert buckets["0.0005"] == 1 and buckets["0.005"] == 3 and buckets["0.25"] == 4 and buckets["+Inf"] == 5
    assert value(fams, "edgefleet_inference_duration_seconds_count") == 5
    assert value(fams, "edgefleet_inference_duration_seconds_sum") == pytest.approx(5.2064)
    info = fams["edgefleet_model_info"].samples[0]
    assert info.labels == {"name": "clf", "version": "1.4.2", "serving_version": "1004002", "sha256": "ab" * 32}
    assert fams["edgefleet_agent_info"].samples[0].labels["device_id"] == "pi-7"
    for name in ("edgefleet_drift_tvd", "edgefleet_drift_confidence_delta", "edgefleet_disk_free_bytes",
                 "process_resident_memory_bytes", "process_cpu_seconds"):
        assert name in fams, name
    assert value(fams, "edgefleet_cache_hit_ratio") == 0.25
    assert value(fams, "edgefleet_window_latency_p50_seconds") == 0.003
    assert value(fams, "edgefleet_http_evicted_connections_total") == 2
    labelled = {f.name for f in fams.values() for s in f.samples if set(s.labels) & {"model", "version", "name"}}
    assert labelled == {"edgefleet_model_info"}  # an OTA swap changes one series, not every one


def test_model_swap_changes_only_the_info_series_and_counters_go_on(tmp_path: Path) -> None:
    model = {"name": "clf", "version": "3", "sha256": "a" * 64}
    svc = fake_service(tmp_path, model)
    svc.model_info = lambda: model
    svc.metrics.record(0.001, OUT, samples=4)
    before = families(metrics_text(svc))
    model = {"name": "clf", "version": "4", "sha256": "b" * 64}
    svc.metrics.record(0.001, OUT)
    after = families(metrics_text(svc))
    assert value(before, "edgefleet_inferences_total") == 4 and value(after, "edgefleet_inferences_total") == 5
    assert after["edgefleet_model_info"].samples[0].labels["version"] == "4"
    svc.model_info = lambda: None
    assert "edgefleet_model_info" not in families(metrics_text(svc))


def test_histogram_and_telemetry_window_see_every_sample_once(tmp_path: Path) -> None:
    """Scrapes and the telemetry thread both drain the samples; neither loses or repeats any."""
    m = Metrics()
    for i in range(10):
        m.record(0.001 * (i + 1), OUT)
    assert m.latency_histogram().count == 10  # a scrape in the middle of a window
    for _ in range(5):
        m.record(0.5, OUT)
    window = m.take_window()
    assert window.inferences == 15 and window.p99_ms == pytest.approx(500.0)
    assert m.latency_histogram().count == 15
    m.record(0.002, OUT)
    assert m.take_window().p50_ms == 2.0 and m.latency_histogram().count == 16


def test_record_does_not_touch_the_histogram() -> None:
    m = Metrics()
    m.record(0.001, OUT)
    assert m.histogram.snapshot().count == 0  # filled by the next reader, off the inference path
    assert m.latency_histogram().count == 1


def test_histogram_bucket_edges_are_inclusive() -> None:
    hist = LatencyHistogram((0.001, 0.01))
    hist.observe(np.asarray([0.001, 0.0010001, 0.01, 3.0]))
    snap = hist.snapshot()
    assert snap.buckets == ((0.001, 1), (0.01, 3)) and snap.count == 4


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not on PATH (apt-get install prometheus)")
def test_promtool_check_metrics_passes(tmp_path: Path) -> None:
    svc = fake_service(tmp_path, {"name": "clf", "version": "3", "sha256": "a" * 64})
    svc.metrics.record(0.002, OUT)
    svc.metrics.take_window()
    result = subprocess.run(["promtool", "check", "metrics"], input=metrics_text(svc), capture_output=True, check=False,
                            text=True, timeout=30)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), \
        result.stdout + result.stderr
