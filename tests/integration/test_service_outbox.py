"""Store-and-forward end to end: a broker outage and an agent restart lose nothing."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from agent.outbox import Outbox
from edgefleet.testing.broker import MosquittoBroker, free_port
from edgefleet.testing.waiting import wait_for
from edgefleet.topics import device_topic, state_topic, telemetry_topic
from tests.integration.service_support import AgentProcess, Observer, agent_config, broker_files_access


def persistent_broker(workdir: Path, port: int | None = None) -> MosquittoBroker:
    """A broker that keeps sessions and queued QoS 1 messages across its own restart."""
    workdir.mkdir(parents=True, exist_ok=True)
    return MosquittoBroker(workdir, port=port, extra_config=broker_files_access() + (
        f"persistence true\npersistence_location {workdir}/\nautosave_interval 1\n"))


def seqs(obs: Observer, device: str) -> list[int]:
    return [b["seq"] for b in obs.on(f"devices/{device}/telemetry")]


def test_broker_outage_of_10_s_leaves_no_gap_in_telemetry_seq(tmp_path: Path) -> None:
    broker = persistent_broker(tmp_path / "broker").start()
    agent = AgentProcess(tmp_path / "agent", agent_config(
        tmp_path / "agent", broker.url, device_id="pi-out", telemetry={"interval_s": 0.25})).start()
    # The observer keeps a persistent session, so what the agent drains while the observer is
    # still reconnecting is queued for it by the broker (the fleet tool does the same).
    obs = Observer(broker.port, topic=telemetry_topic("pi-out"), session=True, client_id="obs-outage")
    try:
        wait_for(lambda: len(seqs(obs, "pi-out")) >= 3, 20, what="telemetry before the outage")
        broker.stop()
        time.sleep(10)
        last_before = max(seqs(obs, "pi-out"))
        broker.start()
        # ~40 messages were produced offline; they drain at the default 50/s after reconnecting.
        wait_for(lambda: max(seqs(obs, "pi-out")) >= last_before + 45, 20, what="drain after the outage")
        got = sorted(set(seqs(obs, "pi-out")))
        assert got == list(range(got[0], got[-1] + 1)), "telemetry seq has a gap"
        assert got[0] == 1
        first_seen = list(dict.fromkeys(seqs(obs, "pi-out")))  # QoS 1 may repeat one; order must hold
        assert first_seen == sorted(first_seen), "drained out of order"
        assert agent.terminate() == 0
    finally:
        obs.close()
        agent.stop_quietly()
        broker.stop()


def test_agent_killed_with_a_full_outbox_drains_it_in_order_after_restart(tmp_path: Path) -> None:
    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"
    cfg = agent_config(tmp_path / "agent", url, device_id="pi-full", telemetry={"interval_s": 0.1},
                       outbox={"max_rows": 20, "drain_per_s": 20})
    # Phase 1: no broker at all. The outbox fills to its bound and drops the oldest; then kill -9.
    agent = AgentProcess(tmp_path / "agent", cfg).start()
    db = tmp_path / "agent" / "state" / "outbox.sqlite"
    try:
        wait_for(lambda: db.exists() and Outbox(db).dropped() > 5, 20, what="a full outbox")
        agent.kill9()  # no shutdown code runs: what a power cut leaves (minus the OS page cache)
    finally:
        agent.stop_quietly()
    box = Outbox(db)
    stored = [json.loads(r.payload) for r in box.after(0, 100)]
    dropped_before = box.dropped()
    box.close()
    assert len(stored) == 20 and dropped_before > 0
    # Phase 2: broker up, agent restarted: the stored backlog arrives, oldest first.
    broker = MosquittoBroker(tmp_path / "broker", port=port).start()
    obs = Observer(port, topic=device_topic("pi-full", "#"))
    agent = AgentProcess(tmp_path / "agent", {**cfg, "telemetry": {"interval_s": 5}}).start()
    try:
        wait_for(lambda: obs.on("pi-full/events") and Outbox(db).pending() == 0, 20, what="outbox emptied")
        # The restart's own "started" event may push the oldest rows out of the full outbox.
        displaced = Outbox(db).dropped() - dropped_before
        expected = [b["seq"] for b in stored[displaced:] if "window_s" in b]
        received = [s for s in seqs(obs, "pi-full") if s <= max(expected)]
        assert received == expected  # all of them, once, in order
        last = obs.on("pi-full/events")[-1]
        assert last["event"] == "started" and last["boot"] == 2
        assert agent.terminate() == 0
    finally:
        obs.close()
        agent.stop_quietly()
        broker.stop()


def forwarding(box: Outbox, broker_url: str, device: str, max_inflight: int, drain_per_s: float) -> tuple[Any, Any]:
    """The agent's outbox forwarder on its own link to ``broker_url`` (started; the link is not)."""
    from agent.config import BrokerConfig
    from agent.mqtt import Forwarder, MqttLink

    fwd = Forwarder(box, max_inflight=max_inflight, drain_per_s=drain_per_s)
    link = MqttLink(BrokerConfig(url=broker_url), f"{device}-link", password=None,
                    will_topic=state_topic(device), will_payload=b"{}", subscriptions=[],
                    on_connected=fwd.notify, on_message=lambda m: None, on_published=fwd.on_published)
    fwd.attach(link)
    fwd.start()
    return fwd, link


def test_backlog_drains_in_order_at_the_configured_rate(broker, tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    for i in range(60):
        box.append(telemetry_topic("pi-rate"), {"i": i}, "telemetry")
    obs = Observer(broker.port, topic=telemetry_topic("pi-rate"))
    fwd, link = forwarding(box, broker.url, "pi-rate", max_inflight=5, drain_per_s=20.0)
    try:
        link.start()
        assert link.wait_connected(10)
        start = time.monotonic()
        wait_for(lambda: box.pending() == 0, 15, what="outbox drained")
        elapsed = time.monotonic() - start
        # 20 at once (one second of burst), then 20 per second: at least 2 s for 60 rows.
        assert elapsed >= 1.8, f"drained 60 rows in {elapsed:.2f} s at 20/s"
        wait_for(lambda: len(obs.on("pi-rate/telemetry")) >= 60, 5, what="all 60 delivered")
        got = [b["seq"] for b in obs.on("pi-rate/telemetry")]
        assert list(dict.fromkeys(got)) == list(range(1, 61))
    finally:
        fwd.stop()
        link.stop()
        obs.close()
        box.close()


def test_a_broker_with_a_small_receive_maximum_never_gets_more_unacknowledged_publishes(tmp_path: Path) -> None:
    """MQTT 5: a broker states in its CONNACK how many QoS 1 publishes it takes unacknowledged
    (Mosquitto: max_inflight_messages). The agent's forwarder allows 20; against a broker that
    says 4, paho must hold the rest back, and the whole backlog still arrives in order."""
    with MosquittoBroker(tmp_path / "b", extra_config="max_inflight_messages 4\n") as small:
        box = Outbox(tmp_path / "o.sqlite")
        for i in range(80):
            box.append(telemetry_topic("pi-rm"), {"i": i}, "telemetry")
        obs = Observer(small.port, topic=telemetry_topic("pi-rm"))
        fwd, link = forwarding(box, small.url, "pi-rm", max_inflight=20, drain_per_s=1000.0)
        unacked: list[int] = []
        original = link.send

        def watching_send(*args: Any, **kwargs: Any) -> Any:
            info = original(*args, **kwargs)
            unacked.append(link._client._inflight_messages)  # paho's count of publishes on the wire
            return info

        link.send = watching_send  # type: ignore[method-assign]
        try:
            link.start()
            assert link.wait_connected(10) and link.receive_maximum == 4
            wait_for(lambda: box.pending() == 0, 20, what="outbox drained")
            wait_for(lambda: len(obs.on("pi-rm/telemetry")) >= 80, 5, what="all 80 delivered")
            assert max(unacked) <= 4, max(unacked)
            assert [b["seq"] for b in obs.on("pi-rm/telemetry")] == list(range(1, 81))
            assert link.connects == 1, "the broker never had a reason to drop us"
        finally:
            fwd.stop()
            link.stop()
            obs.close()
            box.close()
