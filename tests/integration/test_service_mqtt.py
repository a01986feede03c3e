"""The agent as a process against a real Mosquitto: birth, Last Will, clean shutdown, commands."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edgefleet.testing.artifacts import build_artifact
from edgefleet.testing.waiting import wait_for
from edgefleet.topics import (
    device_cmd_topic,
    device_topic,
    events_topic,
    fleet_reply_topic,
    group_cmd_topic,
    response_topic,
    state_topic,
)
from tests.integration.service_support import AgentProcess, Observer, agent_config, command
from tests.support.models import OTA_MODELS


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory):
    return build_artifact(OTA_MODELS / "clf_a.tflite", tmp_path_factory.mktemp("art") / "v1", version="1")


def online_state(obs: Observer) -> dict | None:
    states = obs.on(state_topic("pi-1"))
    return states[-1] if states and states[-1]["online"] else None


def test_birth_is_retained_and_kill_9_publishes_the_last_will_within_1_5_keepalive(
        broker, artifact, tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path, agent_config(tmp_path, broker.url, model=artifact.dir)).start()
    try:
        probe = Observer(broker.port, topic=state_topic("pi-1"))
        wait_for(lambda: online_state(probe), 20, what="birth")
        probe.close()
        # A subscriber arriving later still sees the birth: it is retained.
        late = Observer(broker.port, topic=state_topic("pi-1"))
        state = wait_for(lambda: online_state(late), 5, what="retained birth")
        assert late.raw()[0][2] is True
        assert state["device_id"] == "pi-1" and state["group"] == "g1" and state["profile"] == "x86-dev"
        assert state["model"] == {"name": "clf", "version": "1", "sha256": artifact.manifest.model.sha256}
        assert state["boot"] == 1 and state["agent_version"]
        agent.kill9()
        killed = time.monotonic()
        offline = wait_for(lambda: [s for s in late.on(state_topic("pi-1")) if not s["online"]], 3.0,
                           what="Last Will")
        assert time.monotonic() - killed <= 1.5 * 2
        assert offline[-1]["device_id"] == "pi-1" and offline[-1]["boot"] == 1
        late.close()
    finally:
        agent.stop_quietly()
    # The boot counter is persisted: the next start is boot 2.
    again = AgentProcess(tmp_path, agent_config(tmp_path, broker.url, model=artifact.dir)).start()
    try:
        obs = Observer(broker.port, topic=device_topic("pi-1", "#"))
        wait_for(lambda: (s := online_state(obs)) and s["boot"] == 2, 20, what="second birth")
        assert again.terminate() == 0
        wait_for(lambda: not obs.on(state_topic("pi-1"))[-1]["online"], 5, what="offline on clean stop")
        events = [e["event"] for e in obs.on(events_topic("pi-1"))]
        assert "stopping" in events
        retained = Observer(broker.port, topic=state_topic("pi-1"))
        wait_for(lambda: retained.on(state_topic("pi-1")), 5, what="retained offline state")
        assert retained.on(state_topic("pi-1"))[-1]["online"] is False
        retained.close()
        obs.close()
    finally:
        again.stop_quietly()


@pytest.fixture(scope="module")
def running(broker, artifact, tmp_path_factory: pytest.TempPathFactory):
    """One agent for the command tests (boot and birth cost ~2 s; share them)."""
    tmp = tmp_path_factory.mktemp("cmd-agent")
    cfg = agent_config(tmp, broker.url, device_id="pi-cmd", group="cmdgroup", model=artifact.dir,
                       telemetry={"interval_s": 5})
    agent = AgentProcess(tmp, cfg).start()
    obs = Observer(broker.port)  # everything under the topic root
    wait_for(lambda: any(b.get("online") for b in obs.on("pi-cmd/state")), 20, what="agent birth")
    yield agent, obs
    obs.close()
    agent.stop_quietly()


def reply_for(obs: Observer, cid: str | None, suffix: str, timeout: float = 5.0) -> dict:
    return wait_for(lambda: next((b for b in obs.on(suffix) if b.get("id") == cid), None), timeout,
                    what=f"reply to {cid} on {suffix}")


def test_status_command_replies_on_the_default_response_topic(running) -> None:
    _, obs = running
    cmd = command("status")
    obs.publish(device_cmd_topic("pi-cmd", "status"), cmd)
    reply = reply_for(obs, cmd["id"], response_topic("pi-cmd", "status"))
    assert reply["ok"] is True and reply["device_id"] == "pi-cmd"
    assert reply["result"]["state"]["model"]["name"] == "clf"
    assert reply["result"]["state"]["mqtt"] == "5"


def test_mqtt5_response_topic_and_correlation_data_are_honoured(running) -> None:
    _, obs = running
    cmd = command("status")
    reply_to = fleet_reply_topic("ops-1")
    obs.publish(device_cmd_topic("pi-cmd", "status"), cmd, response_topic=reply_to, correlation=b"corr-42")
    reply_for(obs, cmd["id"], reply_to)
    props = next(p for t, b, _, p in obs.raw() if t == reply_to and b["id"] == cmd["id"])
    assert props.CorrelationData == b"corr-42"


def test_group_command_reaches_the_device(running) -> None:
    _, obs = running
    cmd = command("status")
    obs.publish(group_cmd_topic("cmdgroup", "status"), cmd)
    assert reply_for(obs, cmd["id"], response_topic("pi-cmd", "status"))["ok"] is True


def test_duplicate_id_gets_the_same_reply_without_running_again(running) -> None:
    _, obs = running
    cmd = command("status")
    obs.publish(device_cmd_topic("pi-cmd", "status"), cmd)
    first = reply_for(obs, cmd["id"], response_topic("pi-cmd", "status"))
    time.sleep(0.2)  # a re-execution would report a different uptime and timestamp
    obs.publish(device_cmd_topic("pi-cmd", "status"), cmd)
    wait_for(lambda: len([b for b in obs.on(response_topic("pi-cmd", "status")) if b["id"] == cmd["id"]]) == 2, 5,
             what="second reply")
    replies = [b for b in obs.on(response_topic("pi-cmd", "status")) if b["id"] == cmd["id"]]
    assert replies[0] == replies[1] == first


def test_expired_malformed_and_unknown_commands_get_error_replies_and_the_agent_keeps_running(running) -> None:
    agent, obs = running
    expired = command("status", ts=time.time() - 120, ttl_s=60)
    obs.publish(device_cmd_topic("pi-cmd", "status"), expired)
    assert "expired" in reply_for(obs, expired["id"], response_topic("pi-cmd", "status"))["error"]
    obs.publish(device_cmd_topic("pi-cmd", "config"), b"{not json")
    bad = reply_for(obs, None, response_topic("pi-cmd", "config"))
    assert bad["ok"] is False and "malformed" in bad["error"]
    unknown = command("reboot")
    obs.publish(device_cmd_topic("pi-cmd", "reboot"), unknown)
    assert "unknown command 'reboot'" in reply_for(obs, unknown["id"], response_topic("pi-cmd", "reboot"))["error"]
    no_id = {"ts": time.time()}
    obs.publish(device_cmd_topic("pi-cmd", "status"), no_id)
    wait_for(lambda: [b for b in obs.on(response_topic("pi-cmd", "status")) if b["id"] is None], 5, what="no-id reply")
    bad_cfg = command("config", telemetry={"interval_s": -3})
    obs.publish(device_cmd_topic("pi-cmd", "config"), bad_cfg)
    assert "interval_s" in reply_for(obs, bad_cfg["id"], response_topic("pi-cmd", "config"))["error"]
    ok = command("status")
    obs.publish(device_cmd_topic("pi-cmd", "status"), ok)
    assert reply_for(obs, ok["id"], response_topic("pi-cmd", "status"))["ok"] is True
    assert agent.proc.poll() is None


def test_config_command_changes_the_telemetry_interval(running) -> None:
    _, obs = running
    cmd = command("config", telemetry={"interval_s": 0.2})
    obs.publish(device_cmd_topic("pi-cmd", "config"), cmd)
    reply = reply_for(obs, cmd["id"], response_topic("pi-cmd", "config"))
    assert reply["ok"] and reply["result"]["applied"]["telemetry"]["interval_s"] == 0.2
    before = len(obs.on("pi-cmd/telemetry"))
    time.sleep(1.5)
    assert len(obs.on("pi-cmd/telemetry")) - before >= 4  # was one per 5 s
    back = command("config", telemetry={"interval_s": 5})
    obs.publish(device_cmd_topic("pi-cmd", "config"), back)
    assert reply_for(obs, back["id"], response_topic("pi-cmd", "config"))["ok"]


def test_unsigned_config_cannot_turn_on_a_cache_this_device_was_approved_without(running) -> None:
    _, obs = running  # agent.yaml: cache off
    on = command("config", cache={"enabled": True, "near_threshold": 0.01})
    obs.publish(device_cmd_topic("pi-cmd", "config"), on)
    reply = reply_for(obs, on["id"], response_topic("pi-cmd", "config"), 15)
    assert reply["ok"] is False and "signed config statement" in reply["error"]
    slower = command("config", telemetry={"interval_s": 2})
    obs.publish(device_cmd_topic("pi-cmd", "config"), slower)
    assert reply_for(obs, slower["id"], response_topic("pi-cmd", "config"), 15)["ok"]
    status = command("status")
    obs.publish(device_cmd_topic("pi-cmd", "status"), status)
    engine = reply_for(obs, status["id"], response_topic("pi-cmd", "status"))["result"]["host"]["engine"]
    assert engine["cache"]["enabled"] is False


def test_a_restart_does_not_execute_a_remembered_command_again(broker, artifact, tmp_path: Path) -> None:
    cfg = agent_config(tmp_path, broker.url, device_id="pi-mem", model=artifact.dir, telemetry={"interval_s": 5})
    obs = Observer(broker.port, topic=device_topic("pi-mem", "#"))
    agent = AgentProcess(tmp_path, cfg).start()
    try:
        wait_for(lambda: any(b.get("online") for b in obs.on("pi-mem/state")), 20, what="birth")
        cmd = command("status")
        topic = device_cmd_topic("pi-mem", "status")
        obs.publish(topic, cmd)
        first = reply_for(obs, cmd["id"], "pi-mem/cmd/status/response")
        assert agent.terminate() == 0
        agent.start()
        wait_for(lambda: [b for b in obs.on("pi-mem/state") if b.get("online") and b["boot"] == 2], 20,
                 what="second birth")
        obs.publish(topic, cmd)
        wait_for(lambda: len([b for b in obs.on("pi-mem/cmd/status/response") if b["id"] == cmd["id"]]) == 2,
                 5, what="reply after restart")
        assert [b for b in obs.on("pi-mem/cmd/status/response") if b["id"] == cmd["id"]][1] == first
    finally:
        obs.close()
        agent.stop_quietly()


def test_update_and_rollback_commands_drive_ota_and_the_retained_state(running, tmp_path: Path) -> None:
    _, obs = running
    v2 = build_artifact(OTA_MODELS / "clf_a2.tflite", tmp_path / "v2", version="2",
                        probation={"inferences": 1, "seconds": 1})
    update = command("update", **v2.update_fields(rollout_id="r-svc-1"))
    obs.publish(device_cmd_topic("pi-cmd", "update"), update)
    reply = reply_for(obs, update["id"], response_topic("pi-cmd", "update"))
    assert reply["ok"] is True and reply["result"]["state"] == "queued"

    def ota_states(rollout: str) -> list[str]:
        return [e["state"] for e in obs.on("pi-cmd/events") if e.get("event") == "ota" and e.get("rollout_id") == rollout]

    wait_for(lambda: "committed" in ota_states("r-svc-1"), 30, what="update committed")
    assert ota_states("r-svc-1")[0] == "queued"
    wait_for(lambda: obs.on("pi-cmd/state")[-1]["model"]["version"] == "2", 5, what="state shows version 2")
    events = [e for e in obs.on("pi-cmd/events")]
    assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
    back = command("rollback", to=None, rollout_id="r-svc-back")
    obs.publish(device_cmd_topic("pi-cmd", "rollback"), back)
    assert reply_for(obs, back["id"], response_topic("pi-cmd", "rollback"))["ok"] is True
    wait_for(lambda: "committed" in ota_states("r-svc-back"), 30, what="rollback committed")
    done = [e for e in obs.on("pi-cmd/events") if e.get("rollout_id") == "r-svc-back" and e["state"] == "committed"]
    assert done[-1]["rollback"] is True and done[-1]["version"] == "1"
    wait_for(lambda: obs.on("pi-cmd/state")[-1]["model"]["version"] == "1", 5, what="state back to version 1")


def test_mqtt_3_1_1_works_without_response_topics(broker, tmp_path: Path) -> None:
    from agent.config import parse_config
    from agent.service import AgentService

    cfg = agent_config(tmp_path, broker.url, device_id="pi-v311", broker={"protocol": "3.1.1"})
    obs = Observer(broker.port, topic=device_topic("pi-v311", "#"))
    svc = AgentService(parse_config(cfg))
    svc.start()
    try:
        wait_for(lambda: obs.on("pi-v311/state"), 10, what="birth over 3.1.1")
        assert obs.on("pi-v311/state")[-1]["model"] is None  # no model configured: still reports
        cmd = command("status")
        # A Response Topic cannot reach a 3.1.1 client: the reply goes to the default topic.
        obs.publish(device_cmd_topic("pi-v311", "status"), cmd, response_topic=fleet_reply_topic("x"))
        reply = reply_for(obs, cmd["id"], "pi-v311/cmd/status/response")
        assert reply["result"]["state"]["mqtt"] == "3.1.1"
    finally:
        svc.stop()
        obs.close()


def test_systemd_notify_ready_watchdog_and_stopping(broker, tmp_path: Path) -> None:
    import socket

    # systemd is not running the test: a datagram socket plays its NOTIFY_SOCKET.
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(10)
    agent = AgentProcess(tmp_path, agent_config(tmp_path, broker.url, device_id="pi-sd"),
                         env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"}).start()
    try:
        got = [sock.recv(64).decode() for _ in range(3)]
        assert got[0] == "READY=1" and got[1:] == ["WATCHDOG=1", "WATCHDOG=1"]
        assert agent.terminate() == 0
        rest = []
        while not rest or rest[-1] == "WATCHDOG=1":
            rest.append(sock.recv(64).decode())
        assert rest[-1] == "STOPPING=1"
    finally:
        agent.stop_quietly()
        sock.close()


def test_bad_config_is_one_error_line_and_exit_2_without_traceback(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.integration.service_support import REPO

    cfg = tmp_path / "agent.yaml"
    cfg.write_text("device_id: pi-1\nprofile: rpi4\nstate_dir: s\nbroker: {url: 'mqtt://127.0.0.1:1'}\n"
                   "telemetry: {intervall_s: 5}\n")
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg)], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {cfg}: telemetry.intervall_s: unknown key"
    missing_model = tmp_path / "m.yaml"
    missing_model.write_text(f"device_id: pi-1\nprofile: x86-dev\nstate_dir: {tmp_path}/st\n"
                             "broker: {url: 'mqtt://127.0.0.1:1'}\nmodel: /nonexistent/model\nhttp: {listen: null}\n")
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", str(missing_model)], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_auto_protocol_falls_back_to_3_1_1_when_the_broker_refuses_mqtt5(broker) -> None:
    import socket
    import threading

    from agent.config import BrokerConfig
    from agent.mqtt import MqttLink
    from edgefleet.testing.broker import free_port

    # Mosquitto speaks MQTT 5, so a 3.1.1-only broker is played by a proxy that answers an MQTT 5
    # CONNECT with "unacceptable protocol version" and pipes any 3.1.1 connection to Mosquitto.
    port = free_port()
    server = socket.create_server(("127.0.0.1", port))
    levels: list[int] = []

    def pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            src.close()
            dst.close()

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            first = conn.recv(65536)
            levels.append(first[8])  # protocol level, after the fixed header and "\0\4MQTT"
            if first[8] == 5:
                conn.sendall(b"\x20\x02\x00\x01")
                conn.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", broker.port))
            upstream.sendall(first)
            threading.Thread(target=pipe, args=(conn, upstream), daemon=True).start()
            threading.Thread(target=pipe, args=(upstream, conn), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    link = MqttLink(BrokerConfig(url=f"mqtt://127.0.0.1:{port}", reconnect_min_s=0.5, reconnect_max_s=1),
                    "fallback-test", password=None, will_topic=state_topic("fb"), will_payload=b"{}",
                    subscriptions=[], on_connected=lambda: None, on_message=lambda m: None,
                    on_published=lambda mid: None)
    try:
        link.start()
        assert link.wait_connected(10)
        assert link.protocol == "3.1.1" and levels[:2] == [5, 4]
    finally:
        link.stop()
        server.close()


def test_a_frozen_agent_goes_offline_by_keepalive_and_comes_back_with_a_new_birth(artifact, tmp_path: Path) -> None:
    import signal

    from edgefleet.testing.broker import MosquittoBroker

    # SIGSTOP keeps the TCP connection open but silent, like a device that lost its network:
    # only the broker's keepalive timeout (1.5 x keepalive_s = 3 s) can notice. A private broker,
    # so the timing is not disturbed by other tests' traffic.
    broker = MosquittoBroker(tmp_path / "broker").start()
    agent = AgentProcess(tmp_path, agent_config(tmp_path, broker.url, device_id="pi-frozen",
                                                model=artifact.dir)).start()
    obs = Observer(broker.port, topic=state_topic("pi-frozen"))
    try:
        wait_for(lambda: [s for s in obs.on("pi-frozen/state") if s["online"]], 20, what="birth")
        agent.proc.send_signal(signal.SIGSTOP)
        frozen = time.monotonic()
        # Mosquitto compares whole seconds with ">" (1.5 x 2 s fires after 4-5 s) and checks about
        # once a second; the bound leaves room for a loaded 2-core CI machine (seen: 7.9 s).
        wait_for(lambda: not obs.on("pi-frozen/state")[-1]["online"], 1.5 * 2 + 9.0,
                 what="Last Will after keepalive")
        assert time.monotonic() - frozen > 1.5 * 2 - 1.0, "offline before the keepalive could expire"
        births = len([s for s in obs.on("pi-frozen/state") if s["online"]])
        agent.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: len([s for s in obs.on("pi-frozen/state") if s["online"]]) > births, 10,
                 what="birth after the network came back")
        assert obs.on("pi-frozen/state")[-1]["online"] is True
        assert agent.terminate() == 0
    finally:
        agent.stop_quietly()
        obs.close()
        broker.stop()


def test_a_command_sent_while_the_agent_was_down_is_answered_after_it_starts(broker, artifact,
                                                                              tmp_path: Path) -> None:
    cfg = agent_config(tmp_path, broker.url, device_id="pi-late", model=artifact.dir, telemetry={"interval_s": 5})
    obs = Observer(broker.port, topic=device_topic("pi-late", "#"))
    agent = AgentProcess(tmp_path, cfg).start()
    try:
        wait_for(lambda: [s for s in obs.on("pi-late/state") if s["online"]], 20, what="birth")
        assert agent.terminate() == 0
        fresh, stale = command("status", ttl_s=600), command("status", ttl_s=0.5)
        obs.publish(device_cmd_topic("pi-late", "status"), fresh)  # queued in the agent's session
        obs.publish(device_cmd_topic("pi-late", "status"), stale)
        time.sleep(1.0)  # the stale one expires while the device is away
        agent.start()
        assert reply_for(obs, fresh["id"], "pi-late/cmd/status/response", 20)["ok"] is True
        assert "expired" in reply_for(obs, stale["id"], "pi-late/cmd/status/response")["error"]
    finally:
        agent.stop_quietly()
        obs.close()


def test_a_damaged_committed_model_leaves_the_agent_reachable_and_an_update_repairs_it(
        broker, artifact, tmp_path: Path) -> None:
    cfg = agent_config(tmp_path, broker.url, device_id="pi-dmg", model=artifact.dir, telemetry={"interval_s": 5})
    obs = Observer(broker.port, topic=device_topic("pi-dmg", "#"))
    agent = AgentProcess(tmp_path, cfg).start()
    try:
        wait_for(lambda: [s for s in obs.on("pi-dmg/state") if s["online"]], 20, what="birth")
        assert agent.terminate() == 0
        slots = list((tmp_path / "state" / "ota" / "slots").glob("*/model.tflite"))
        assert slots
        for model in slots:  # bit rot on the SD card
            model.write_bytes(b"\0" * model.stat().st_size)
        agent.start()
        wait_for(lambda: [e for e in obs.on("pi-dmg/events") if e["event"] == "model_error"], 20,
                 what="model_error event")
        state = wait_for(lambda: [s for s in obs.on("pi-dmg/state") if s["online"] and s["boot"] == 2], 10,
                         what="online without a model")[-1]
        assert state["model"] is None
        v2 = build_artifact(OTA_MODELS / "clf_a2.tflite", tmp_path / "v2", version="2",
                            probation={"inferences": 1, "seconds": 1})
        update = command("update", **v2.update_fields(rollout_id="r-repair"))
        obs.publish(device_cmd_topic("pi-dmg", "update"), update)
        assert reply_for(obs, update["id"], "pi-dmg/cmd/update/response")["ok"] is True
        wait_for(lambda: (obs.on("pi-dmg/state")[-1]["model"] or {}).get("version") == "2", 30,
                 what=f"repaired by the update; log:\n{agent.log()[-1500:]}")
    finally:
        agent.stop_quietly()
        obs.close()
