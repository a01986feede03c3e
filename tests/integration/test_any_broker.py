"""The contract on any MQTT engine: Mosquitto (MQTT 5) and NATS's MQTT gateway (3.1.1 only).

Real agents, the real fleet tool and real brokers started by the test on free loopback ports.
Nothing is simulated: each agent runs the real OTA path (download from the fleet tool's HTTP
server, signature check, validation in a child process, install, probation).
NATS has no MQTT 5 properties (no Response Topic, no Correlation Data, no session expiry), so
these show that request/reply, retained state, Last Will, persistent sessions and QoS 1 work
through what both versions define: the reply routing travels in the payload.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgefleet.messages import decode
from edgefleet.mqtt import connect
from edgefleet.signing import generate_keypair, load_private_key
from edgefleet.testing.artifacts import build_artifact
from edgefleet.testing.broker import MosquittoBroker
from edgefleet.testing.nats import NatsServer, find_nats_server
from edgefleet.testing.waiting import wait_for
from edgefleet.topics import all_devices
from tests.fleet.conftest import REPO, run_cli
from tests.integration.service_support import AgentProcess, agent_config, broker_files_access, stop_all
from tests.support.models import OTA_MODELS

pytestmark = [pytest.mark.agents, pytest.mark.timeout(300)]

N_AGENTS = 10
N_CLUSTER = 5  # agents in the cluster failover scenario
PROBATION = {"inferences": 5, "seconds": 1}


class Engine:
    """One broker the test can stop and start again on the same port (an outage)."""

    def __init__(self, kind: str, workdir: Path) -> None:
        self.kind = kind
        if kind == "mosquitto":
            self.server: Any = MosquittoBroker(workdir, extra_config=broker_files_access() + (
                f"persistence true\npersistence_location {workdir}/\nautosave_interval 1\n"))
        else:
            self.server = NatsServer(workdir)

    @property
    def url(self) -> str:
        return self.server.url if self.kind == "mosquitto" else self.server.mqtt_url

    @property
    def protocol(self) -> str:
        return "5" if self.kind == "mosquitto" else "3.1.1"

    def start(self) -> Engine:
        self.server.start()
        if self.kind == "nats":
            self.server.wait_ready()
        return self

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="module", params=["mosquitto", "nats"])
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    if request.param == "nats" and find_nats_server() is None:
        pytest.skip("nats-server is not installed: run `make broker`")
    eng = Engine(request.param, tmp_path_factory.mktemp(f"engine-{request.param}")).start()
    yield eng
    eng.stop()


class Collector:
    """The fleet tool's own MQTT client, as an observer (it negotiates the version too)."""

    def __init__(self, url: str, topics: list[str], client_id: str) -> None:
        self.seen: list[tuple[str, dict[str, Any], bool]] = []
        self.client = connect(url, client_id=client_id, persistent=True, on_message=self._on)
        self.client.subscribe(topics)

    def _on(self, msg: Any) -> None:
        try:
            self.seen.append((msg.topic, decode(msg.payload), msg.retain))
        except ValueError:
            pass

    def bodies(self, suffix: str) -> list[dict[str, Any]]:
        return [b for t, b, _ in list(self.seen) if t.endswith(suffix)]

    def close(self) -> None:
        self.client.close(end_session=True)


def test_the_fleet_tool_negotiates_the_version_the_broker_speaks(engine: Engine) -> None:
    client = connect(engine.url, client_id="negotiate")
    try:
        assert client.protocol == engine.protocol
    finally:
        client.close()


def test_telemetry_survives_a_broker_outage_without_a_seq_gap(engine: Engine, tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path / "agent", agent_config(
        tmp_path / "agent", engine.url, device_id=f"out-{engine.kind}", telemetry={"interval_s": 0.25})).start()
    obs = Collector(engine.url, [all_devices("telemetry")], client_id=f"obs-outage-{engine.kind}")

    def seqs() -> list[int]:
        return [b["seq"] for b in obs.bodies(f"out-{engine.kind}/telemetry")]

    try:
        wait_for(lambda: len(seqs()) >= 3, 30, what="telemetry before the outage")
        engine.stop()
        time.sleep(5)
        last_before = max(seqs())
        engine.start()
        wait_for(lambda: seqs() and max(seqs()) >= last_before + 25, 60, what="drain after the outage")
        got = sorted(set(seqs()))
        assert got == list(range(got[0], got[-1] + 1)), f"telemetry seq has a gap: {got}"
        assert agent.terminate() == 0
    finally:
        obs.close()
        agent.stop_quietly()


def _versions(url: str, group: str) -> dict[str, str | None]:
    r = run_cli("devices", "--broker", url, "--json")
    assert r.returncode == 0, r.stderr
    return {d["device_id"]: (d["model"] or {}).get("version") for d in json.loads(r.stdout)
            if d["online"] and d["group"] == group}


def test_canary_rollout_abort_and_operator_rollback_on_10_real_agents(engine: Engine, tmp_path: Path) -> None:
    group = f"fleet-{engine.kind}"
    key_path, pub_path = generate_keypair(tmp_path / "keys")
    key = load_private_key(key_path)
    v1 = build_artifact(OTA_MODELS / "clf_a.tflite", tmp_path / "v1", version="1", key=key, golden_samples=2,
                        probation=PROBATION)
    v2 = build_artifact(OTA_MODELS / "clf_a2.tflite", tmp_path / "v2", version="2", golden_samples=2,
                        probation=PROBATION)
    broken = build_artifact(OTA_MODELS / "nan.tflite", tmp_path / "v3", version="3", golden_samples=2,
                            new_contract=True, probation=PROBATION)
    agents = [AgentProcess(tmp_path / f"a{i}", agent_config(
        tmp_path / f"a{i}", engine.url, device_id=f"{group}-{i:02d}", group=group, model=v1.dir,
        trusted_keys=[str(pub_path)], telemetry={"interval_s": 30})).start() for i in range(N_AGENTS)]
    obs = Collector(engine.url, [all_devices("events")], client_id=f"obs-installs-{engine.kind}")
    data = str(tmp_path / "data")
    common = ["--broker", engine.url, "--group", group, "--canary", "2", "--wave-base", "4",
              "--sign-key", str(key_path), "--serve", "127.0.0.1:0", "--device-timeout", "90",
              "--json", "--data-dir", data]
    try:
        wait_for(lambda: len(_versions(engine.url, group)) == N_AGENTS, 120, interval=1.0,
                 what=f"{N_AGENTS} agents online on {engine.kind}")

        # devices with trusted keys advertise signed_updates: an unsigned artifact never leaves the laptop
        unsigned = build_artifact(OTA_MODELS / "clf_a2.tflite", tmp_path / "unsigned", version="9", golden_samples=1)
        refused = run_cli("deploy", str(unsigned.dir), "--broker", engine.url, "--group", group, "--serve",
                          "127.0.0.1:0", "--data-dir", str(tmp_path / "refused"), timeout=60)
        assert refused.returncode == 2 and refused.stderr.startswith("error: ") and "sign" in refused.stderr

        good = run_cli("deploy", str(v2.dir), *common, timeout=200)
        assert good.returncode == 0, good.stdout + good.stderr + agents[0].log()[-3000:]
        summary = json.loads(good.stdout)
        assert summary["state"] == "SUCCEEDED" and summary["counts"]["SUCCEEDED"] == N_AGENTS
        wait_for(lambda: set(_versions(engine.url, group).values()) == {"2"}, 30, interval=1.0,
                 what="every agent reporting version 2")
        commits = [b for b in obs.bodies("/events") if b.get("state") == "committed" and b.get("version") == "2"]
        assert len({b.get("rollout_id") for b in commits}) == 1
        assert len(commits) == N_AGENTS, "each device installs v2 exactly once"

        bad = run_cli("deploy", str(broken.dir), *common, timeout=200)
        assert bad.returncode == 1, bad.stdout + bad.stderr
        summary = json.loads(bad.stdout)
        assert summary["state"] == "ABORTED"
        assert [e["state"] for e in summary["executions"]][2:] == ["CANCELED"] * (N_AGENTS - 2)
        assert set(_versions(engine.url, group).values()) == {"2"}

        back = run_cli("rollback", "--broker", engine.url, "--group", group, "--to", "1", "--wait", "--json",
                       "--sign-key", str(key_path), "--device-timeout", "90", "--data-dir", data, timeout=200)
        assert back.returncode == 0, back.stdout + back.stderr
        assert json.loads(back.stdout)["counts"]["SUCCEEDED"] == N_AGENTS
        wait_for(lambda: set(_versions(engine.url, group).values()) == {"1"}, 30, interval=1.0,
                 what="every agent back on version 1")
    finally:
        obs.close()
        stop_all(agents)


def test_a_subscription_the_broker_refuses_is_retried_and_reported_never_silently_missing(tmp_path: Path) -> None:
    """NATS answers SUBACK 0x80 when it cannot create the JetStream consumer behind a QoS 1
    subscription (here: the account's consumer limit; in production: load). The agent says in
    its state and telemetry what it lacks, keeps asking, and has it once the broker can."""
    if find_nats_server() is None:
        pytest.skip("nats-server is not installed: run `make broker`")
    nats = NatsServer(tmp_path / "nats", max_consumers=2)  # the agent's own commands fit, its group's do not
    nats.start()
    nats.wait_ready()
    obs = agent = None
    try:
        obs = Collector(nats.mqtt_url, [all_devices("telemetry"), all_devices("state")], client_id="obs-suback")
        agent = AgentProcess(tmp_path / "agent", agent_config(
            tmp_path / "agent", nats.mqtt_url, device_id="pi-sub", group="g9", telemetry={"interval_s": 0.3})).start()
        group_topic = "edgefleet/v1/groups/g9/cmd/+"
        wait_for(lambda: any(group_topic in b.get("refused_subscriptions", ()) for b in obs.bodies("pi-sub/telemetry")),
                 30, what="the refused subscription reported in telemetry")
        states = [b for b in obs.bodies("pi-sub/state") if b.get("online")]
        assert states and states[-1]["mqtt"] == "3.1.1" and states[-1]["broker"] == nats.mqtt_url
        nats.stop()  # a limit change needs a restart (nats-server 2.9 crashes reloading MQTT accounts)
        nats.max_consumers = 20
        nats.start()
        nats.wait_ready()
        n = len(obs.bodies("pi-sub/telemetry"))
        wait_for(lambda: any("refused_subscriptions" not in b for b in obs.bodies("pi-sub/telemetry")[n:]), 30,
                 what="the subscription granted after the broker could")
        assert "refused subscription" in agent.log()
        assert agent.proc.poll() is None
    finally:
        if obs is not None:
            obs.close()
        if agent is not None:
            agent.stop_quietly()
        nats.stop()


def test_killing_the_node_the_agents_are_on_mid_rollout_every_device_still_commits_once(tmp_path: Path) -> None:
    """A 3-node NATS cluster without a load balancer: agents list all nodes (broker.urls) and sit
    on the first; the fleet tool is on another. Mid-rollout the agents' node is killed with -9.
    They move to the next node, resume their sessions, and every device ends on v2, reported by
    `edge-fleet status`, with exactly one install each (the dedup holds across the reconnect).
    Five agents (a canary of one, then waves of two) keep it inside `make test`'s budget."""
    from edgefleet.testing.nats import NatsCluster

    if find_nats_server() is None:
        pytest.skip("nats-server is not installed: run `make broker`")
    group = "cluster"
    key_path, pub_path = generate_keypair(tmp_path / "keys")
    key = load_private_key(key_path)
    v1 = build_artifact(OTA_MODELS / "clf_a.tflite", tmp_path / "v1", version="1", key=key, golden_samples=2,
                        probation=PROBATION)
    v2 = build_artifact(OTA_MODELS / "clf_a2.tflite", tmp_path / "v2", version="2", golden_samples=2,
                        probation={"inferences": 5, "seconds": 3})
    with NatsCluster(tmp_path / "nats", size=3) as cluster:
        urls = cluster.mqtt_urls
        fleet_urls = ",".join([urls[1], urls[2], urls[0]])
        agents = [AgentProcess(tmp_path / f"a{i}", agent_config(
            tmp_path / f"a{i}", urls[0], device_id=f"{group}-{i:02d}", group=group, model=v1.dir,
            trusted_keys=[str(pub_path)], telemetry={"interval_s": 30},
            broker={"url": None, "urls": urls, "keepalive_s": 2, "reconnect_min_s": 0.5,
                    "reconnect_max_s": 2})).start() for i in range(N_CLUSTER)]
        obs = Collector(urls[2], [all_devices("events")], client_id="obs-cluster")
        deploy = None
        try:
            wait_for(lambda: len(_versions(fleet_urls, group)) == N_CLUSTER, 120, interval=1.0,
                     what="agents online on the cluster")
            deploy = subprocess.Popen(
                [sys.executable, "-m", "fleet.cli", "deploy", str(v2.dir), "--broker", fleet_urls, "--group", group, "--canary", "1",
                 "--wave-base", "2", "--sign-key", str(key_path), "--serve", "127.0.0.1:0", "--device-timeout",
                 "120", "--json", "--data-dir", str(tmp_path / "data")],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
            wait_for(lambda: len([b for b in obs.bodies("/events")
                                  if b.get("state") == "committed" and b.get("version") == "2"]) >= 1, 120,
                     what="the canary committed")
            cluster.nodes[0].stop(kill=True)
            out, err = deploy.communicate(timeout=240)
            assert deploy.returncode == 0, out[-3000:] + err[-3000:] + agents[0].log()[-3000:]
            summary = json.loads(out)
            assert summary["state"] == "SUCCEEDED" and summary["counts"]["SUCCEEDED"] == N_CLUSTER
            status = run_cli("status", summary["rollout_id"], "--json", "--data-dir", str(tmp_path / "data"))
            assert status.returncode == 0 and json.loads(status.stdout)["state"] == "SUCCEEDED", status.stderr
            wait_for(lambda: set(_versions(fleet_urls, group).values()) == {"2"}, 60, interval=1.0,
                     what="every agent reporting version 2 on the surviving nodes")
            installs: dict[str, int] = {}
            for topic, body, _ in list(obs.seen):
                if body.get("state") == "installing" and body.get("version") == "2":
                    device = topic.split("/")[3]
                    installs[device] = installs.get(device, 0) + 1
            assert installs == {f"{group}-{i:02d}": 1 for i in range(N_CLUSTER)}, installs
        finally:
            if deploy is not None and deploy.poll() is None:
                deploy.kill()
            obs.close()
            for a in agents:
                a.stop_quietly()
