"""The device's promise under attack: a real agent process, its MQTT commands and its REST endpoint.

"A device left alone for months keeps answering with a model that the fleet's keys approved,
whatever arrives over the network and whatever fails on it." Each test is named after the
attack and asserts what a user sees: the answers served, the refusal reason, /healthz, the
systemd watchdog.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgefleet.signing import generate_keypair, load_private_key
from edgefleet.statements import make_statement
from edgefleet.testing.artifacts import build_artifact
from edgefleet.testing.broker import free_port
from edgefleet.testing.waiting import wait_for
from edgefleet.topics import device_cmd_topic, device_topic, response_topic
from tests.integration.service_support import (
    HANGING_INPUT,
    AgentProcess,
    NotifySocket,
    Observer,
    agent_config,
    build_hanging_model,
    command,
    http_json,
)
from tests.support.models import OTA_MODELS

DEVICE = "pi-att"
PREDICT = "/v1/models/clf:predict"
LOOSE = {"near_threshold": 1.0, "verify_fraction": 0.0, "max_age_s": 1e6, "max_consecutive": 1_000_000,
         "target_disagreement": 1.0, "confidence": 0.5, "max_verify_fraction": 0.0}
"""The reviewer's attack: every input after the first is a 'near hit' and gets an earlier answer."""
APPROVED = {"near_threshold": 0.25, "verify_fraction": 0.05, "max_age_s": 2.0, "max_consecutive": 10,
            "target_disagreement": 0.01, "confidence": 0.95, "max_verify_fraction": 0.5}
"""x86-dev's cache defaults: the device's approved settings in these tests."""
FRAMES = np.random.default_rng(5).uniform(-1, 1, (30, 32, 32, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory):
    return build_artifact(OTA_MODELS / "clf_a.tflite", tmp_path_factory.mktemp("art") / "v1", version="1")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory):
    key_path, pub_path = generate_keypair(tmp_path_factory.mktemp("keys"))
    return load_private_key(key_path), pub_path


@pytest.fixture(scope="module")
def cached_agent(broker, artifact, keys, tmp_path_factory: pytest.TempPathFactory):
    """One agent with the profile's cache on, a trusted fleet key and REST on a free port."""
    tmp = tmp_path_factory.mktemp("cache-agent")
    port = free_port()
    cfg = agent_config(tmp, broker.url, device_id=DEVICE, model=artifact.dir, cache={"enabled": True},
                       http={"listen": f"127.0.0.1:{port}"}, trusted_keys=[str(keys[1])],
                       telemetry={"interval_s": 5}, commands={"rate_per_min": 6000})
    agent = AgentProcess(tmp, cfg).start()
    obs = Observer(broker.port)
    wait_for(lambda: _healthz(port)[0] == 200, 30, what="agent serving")
    yield agent, obs, port
    obs.close()
    agent.stop_quietly()


def _healthz(port: int) -> tuple[int, object]:
    try:
        return http_json(port, "GET", "/healthz", timeout=2)
    except OSError:
        return 0, None


def answers(port: int) -> list[list[float]]:
    """The 30 REST answers, one request per frame (what a camera client would see)."""
    out = []
    for frame in FRAMES:
        status, body = http_json(port, "POST", PREDICT, {"instances": [frame.tolist()]})
        assert status == 200, body
        out.append(body["predictions"][0])
    return out


def send(obs: Observer, name: str, cmd: dict, timeout: float = 20.0) -> dict:
    obs.publish(device_cmd_topic(DEVICE, name), cmd)
    return wait_for(lambda: next((b for b in obs.on(response_topic(DEVICE, name)) if b.get("id") == cmd["id"]),
                                 None), timeout, what=f"reply to {name}")


def cache_in_use(obs: Observer) -> dict:
    return send(obs, "status", command("status"))["result"]["host"]["engine"]["cache"]["config"]


def changed(a: list[list[float]], b: list[list[float]]) -> int:
    return sum(not np.allclose(x, y, atol=1e-6) for x, y in zip(a, b))


# ------------------------------------------------------------------ config commands
def test_unsigned_config_that_tightens_is_applied(cached_agent) -> None:
    _, obs, port = cached_agent
    before = answers(port)
    reply = send(obs, "config", command("config", cache={"near_threshold": 0.01, "verify_fraction": 0.5,
                                                         "max_consecutive": 3}))
    assert reply["ok"] is True, reply
    assert reply["result"]["loosened"] == []
    in_use = cache_in_use(obs)
    assert (in_use["near_threshold"], in_use["verify_fraction"], in_use["max_consecutive"]) == (0.01, 0.5, 3)
    assert answers(port) == before
    # Back to the approved settings: looser than in use, but not looser than approved -> no signature.
    assert send(obs, "config", command("config", cache=APPROVED))["ok"] is True


def test_unsigned_config_that_loosens_the_cache_is_refused_and_answers_are_unchanged(cached_agent) -> None:
    _, obs, port = cached_agent
    before = answers(port)
    reply = send(obs, "config", command("config", cache=LOOSE))
    assert reply["ok"] is False
    assert "looser than this device's approved settings" in reply["error"]
    assert "needs a signed config statement" in reply["error"]
    assert {k: cache_in_use(obs)[k] for k in APPROVED} == APPROVED
    assert answers(port) == before  # all 30, bit for bit


def test_signed_config_statement_loosens_once_and_its_replay_is_refused(cached_agent, keys) -> None:
    _, obs, port = cached_agent
    baseline = answers(port)
    statement, signature = make_statement("config", keys[0], device=DEVICE, settings=LOOSE)
    signed = {"cache": LOOSE, "statement": statement, "statement_signature": signature}
    reply = send(obs, "config", command("config", **signed))
    assert reply["ok"] is True, reply
    assert sorted(reply["result"]["loosened"]) == sorted(LOOSE)
    assert {k: cache_in_use(obs)[k] for k in LOOSE} == LOOSE
    assert changed(answers(port), baseline) >= 10  # the fleet's key allowed it: the cache now answers
    assert send(obs, "config", command("config", cache=APPROVED))["ok"] is True  # the operator tightens again
    assert answers(port) == baseline
    replay = send(obs, "config", command("config", **signed))  # a captured statement, a fresh command id
    assert replay["ok"] is False and "already used" in replay["error"]
    assert answers(port) == baseline
    # A statement for one setting does not cover another.
    narrow, sig = make_statement("config", keys[0], device=DEVICE, settings={"near_threshold": 1.0})
    refused = send(obs, "config", command("config", cache=LOOSE, statement=narrow, statement_signature=sig))
    assert refused["ok"] is False and "the statement does not allow" in refused["error"]
    assert answers(port) == baseline


def test_damaged_statement_ledger_refuses_signed_statements_and_keeps_serving(
        broker, artifact, keys, tmp_path: Path) -> None:
    port = free_port()
    cfg = agent_config(tmp_path, broker.url, device_id=DEVICE + "-l", model=artifact.dir, cache={"enabled": True},
                       http={"listen": f"127.0.0.1:{port}"}, trusted_keys=[str(keys[1])])
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "statements.json").write_text("{not json")  # a power cut mid-write, a bad card
    agent = AgentProcess(tmp_path, cfg).start()
    obs = Observer(broker.port)
    try:
        wait_for(lambda: _healthz(port)[0] == 200, 30, what="agent serving")
        statement, signature = make_statement("config", keys[0], device=DEVICE + "-l", settings=LOOSE)
        cmd = command("config", cache=LOOSE, statement=statement, statement_signature=signature)
        obs.publish(device_cmd_topic(DEVICE + "-l", "config"), cmd)
        reply = wait_for(lambda: next((b for b in obs.on(response_topic(DEVICE + "-l", "config"))
                                       if b.get("id") == cmd["id"]), None), 20, what="config reply")
        assert reply["ok"] is False and "unreadable statement ledger" in reply["error"]
        status, body = http_json(port, "POST", PREDICT, {"instances": [FRAMES[0].tolist()]})
        assert status == 200 and len(body["predictions"]) == 1
    finally:
        obs.close()
        agent.stop_quietly()


# ------------------------------------------------------------------ a model that hangs
@pytest.fixture(scope="module")
def hanging(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("hang")
    model = build_hanging_model(tmp / "hang.tflite")
    return build_artifact(model, tmp / "art", name="hang", version="1")


def test_model_hanging_on_one_input_stops_the_watchdog_and_healthz_reports_stuck(
        broker, hanging, tmp_path: Path) -> None:
    """A real model (a TFLite WHILE loop) that runs for many minutes on one input; 0.5 s deadline."""
    port = free_port()
    notify = NotifySocket(tmp_path / "notify.sock")
    cfg = agent_config(tmp_path, broker.url, device_id="pi-hang", model=hanging.dir,
                       http={"listen": f"127.0.0.1:{port}"}, inference={"deadline_s": 0.5})
    agent = AgentProcess(tmp_path, cfg, env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"})
    agent.start()
    try:
        wait_for(lambda: _healthz(port)[0] == 200, 30, what="agent serving")
        idle_since = time.monotonic()
        wait_for(lambda: len(notify.pings_after(idle_since)) >= 3, 5, what="watchdog pings while idle (canary)")
        ok, body = http_json(port, "POST", "/v1/models/hang:predict", {"instances": [[0.1, 0.2, 0.3, 0.4]]})
        assert ok == 200 and len(body["predictions"][0]) == 4

        poison = threading.Thread(target=lambda: _quietly(lambda: http_json(
            port, "POST", "/v1/models/hang:predict", {"instances": HANGING_INPUT}, timeout=60)), daemon=True)
        poison.start()
        _, health = wait_for(lambda: (r := _healthz(port))[0] == 503 and r, 5, what="healthz 503")
        stuck_seen = time.monotonic()
        assert health["ok"] is False and health["status"] == "stuck" and health["stuck_workers"] == 1
        assert health["stuck_for_s"] >= 0.5 and health["model"]["name"] == "hang"

        # A second caller is not left waiting behind the hung interpreter: it gets an answer.
        t0 = time.monotonic()
        busy, body = http_json(port, "POST", "/v1/models/hang:predict", {"instances": [[0.1, 0.2, 0.3, 0.4]]})
        assert time.monotonic() - t0 < 3.0
        assert busy == 503 and "no interpreter free within 0.5 s" in body["error"]

        time.sleep(2.0)  # two WatchdogSec/2 windows: systemd would restart us now
        assert notify.pings_after(stuck_seen) == []
        assert _healthz(port)[0] == 503
        assert agent.proc.poll() is None
        assert "withholding WATCHDOG=1" in agent.log()
    finally:
        agent.stop_quietly()
        notify.close()


def _quietly(fn) -> None:
    try:
        fn()
    except OSError:
        pass


# ------------------------------------------------------------------ bad input on the directory door
def test_decompression_bomb_png_goes_to_failed_and_the_source_keeps_running(broker, artifact, tmp_path: Path) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    results = tmp_path / "results.jsonl"
    cfg = agent_config(tmp_path, broker.url, device_id="pi-bomb", model=artifact.dir,
                       source={"type": "directory", "path": str(frames), "poll_interval_s": 0.05, "settle_s": 0},
                       sinks={"jsonl": str(results)})
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20_000, 20_000)).save(bomb)  # 400 M pixels in a few tens of KB
    assert bomb.stat().st_size < 100_000
    agent = AgentProcess(tmp_path, cfg).start()
    try:
        bomb.rename(frames / "bomb.png")
        wait_for(lambda: (frames / "failed" / "bomb.png").exists(), 30, what="bomb moved to failed/")
        for i in range(2):  # the same thread keeps serving the next files
            np.save(frames / f".tmp{i}.npy", FRAMES[i][None])
            (frames / f".tmp{i}.npy").rename(frames / f"good{i}.npy")
            wait_for(lambda i=i: (frames / "done" / f"good{i}.npy").exists(), 10, what=f"good{i} done")
        wait_for(lambda: results.exists() and len(results.read_text().splitlines()) == 2, 5, what="2 results")
        assert agent.proc.poll() is None
        assert "bomb.png" in agent.log()
    finally:
        agent.stop_quietly()


# ------------------------------------------------------------------ cancel
def test_cancel_command_stops_an_update_crawling_in_from_a_slow_server(broker, tmp_path: Path) -> None:
    """A server that sends 4 KB every 0.2 s would keep the update downloading for minutes: the
    operator's cancel command stops it, the device reports it failed and keeps serving v1."""
    from edgefleet.testing.http_server import ArtifactServer

    v1 = build_artifact(OTA_MODELS / "clf_a.tflite", tmp_path / "v1", version="1", golden_samples=1)
    v2 = build_artifact(OTA_MODELS / "clf_a2.tflite", tmp_path / "v2", version="2", golden_samples=1)
    obs = Observer(broker.port, topic=device_topic("pi-cancel", "#"))
    agent = AgentProcess(tmp_path / "agent", agent_config(tmp_path / "agent", broker.url, device_id="pi-cancel",
                                                          model=v1.dir)).start()
    with ArtifactServer() as http:
        url = http.add("/v2/model.tflite", v2.model_path.read_bytes(), trickle_s=0.2, trickle_bytes=4096)
        try:
            wait_for(lambda: any(b.get("online") for b in obs.on("pi-cancel/state")), 30, what="birth")
            update = command("update", **v2.update_fields(url, rollout_id="r-slow"))
            obs.publish(device_cmd_topic("pi-cancel", "update"), update)
            wait_for(lambda: any(b.get("state") == "downloading" for b in obs.on("pi-cancel/events")), 20,
                     what="the update downloading")
            cancel = command("cancel", rollout_id="r-slow")
            obs.publish(device_cmd_topic("pi-cancel", "cancel"), cancel)
            reply = wait_for(lambda: next((b for b in obs.on("pi-cancel/cmd/cancel/response")
                                           if b.get("id") == cancel["id"]), None), 15, what="the cancel reply")
            assert reply["ok"], reply
            final = wait_for(lambda: next((b for b in obs.on("pi-cancel/events") if b.get("rollout_id") == "r-slow"
                                           and b.get("state") == "failed"), None), 15, what="the update failed")
            assert final["reason"] == "canceled by command"
            status = command("status")
            obs.publish(device_cmd_topic("pi-cancel", "status"), status)
            answer = wait_for(lambda: next((b for b in obs.on("pi-cancel/cmd/status/response")
                                            if b.get("id") == status["id"]), None), 15, what="status")
            assert answer["result"]["state"]["model"]["version"] == "1"
        finally:
            obs.close()
            agent.stop_quietly()
