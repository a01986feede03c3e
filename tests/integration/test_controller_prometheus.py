"""A real Prometheus scrapes the controller's exporter; PromQL through its HTTP API sees the fleet."""

from __future__ import annotations

import pytest

from edgefleet.testing.waiting import wait_for
from tests.fleet.conftest import make_artifact
from tests.integration import test_controller as support
from tests.integration.test_controller import Controller, _sim, _submit

controllers = support.controllers
token_file = support.token_file


@pytest.fixture()
def prometheus_for():
    from edgefleet.testing.prometheus import PrometheusServer, find_prometheus

    if find_prometheus() is None:
        pytest.skip("prometheus binary missing: run `make broker`")
    started = []

    def start(target: str) -> PrometheusServer:
        server = PrometheusServer([target], scrape_interval="1s").start()
        started.append(server)
        return server
    yield start
    for server in started:
        server.close()


def test_the_documented_scrape_config_and_alert_rules_are_valid():
    import shutil
    import subprocess

    from tests.fleet.conftest import REPO

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool missing (Debian's prometheus package): run `make broker`")
    for args in (["check", "rules", "alerts.yml"], ["check", "config", "prometheus.yml"]):
        r = subprocess.run([promtool, *args], cwd=REPO / "docs" / "prometheus", capture_output=True, text=True,
                           check=False)
        assert r.returncode == 0, r.stdout + r.stderr


def test_prometheus_sees_the_fleet_inference_rate_model_versions_and_rollout_progress(
        broker, token_file, tmp_path, controllers, prometheus_for):
    ctl = Controller(f"sqlite:///{tmp_path / 'fleet.db'}", broker.url, token_file, tmp_path / "ctl")
    controllers.append(ctl)
    with _sim(broker, "prom", n=5, telemetry_interval=0.5):
        prom = prometheus_for(ctl.metrics.removeprefix("http://").removesuffix("/metrics"))

        def fleet_rate():
            result = prom.query('sum(edgefleet_device_inference_rate{group="prom"})')
            return result and float(result[0]["value"][1])
        rate = wait_for(fleet_rate, 30, interval=0.5, what="Prometheus to scrape telemetry")
        assert 5 * 100 / 0.5 <= rate <= 5 * 107 / 0.5, "5 devices at 100..106 inferences per 0.5 s window"
        info = prom.query('edgefleet_device_model_info{device="prom-00003"}')
        assert info and info[0]["metric"]["version"] == "1" and info[0]["metric"]["model"] == "demo"
        rollout_id = _submit(ctl, token_file, make_artifact(tmp_path / "v2", "2"), "prom", "--canary", "1")

        def updated_version():
            found = prom.query('edgefleet_device_model_info{device="prom-00003"}')
            return found and found[0]["metric"]["version"] == "2"
        wait_for(updated_version, 40, interval=0.5, what="the device's new model version in Prometheus")
        progress = wait_for(lambda: prom.query(f'edgefleet_rollout_progress_ratio{{rollout="{rollout_id}"}} == 1'),
                            30, interval=0.5, what="the rollout's progress to reach 1")
        assert progress
        latency = prom.query('histogram_quantile(0.5, sum by (le) (rate(edgefleet_device_latency_seconds_bucket'
                             '{group="prom"}[5s])))')
        assert latency and 0.0025 <= float(latency[0]["value"][1]) <= 0.01, "p50 of 4 ms lies in the 2.5..10 ms buckets"
