"""Models that pass validation and then misbehave on the device, through a real agent process.

v1 is a normal classifier; v2 is a signed update whose model (a real TFLite WHILE loop, see
:func:`tests.integration.service_support.build_hanging_model`) answers at once on inputs in
[-1, 1] -- its golden samples, so it passes validation -- and runs for many minutes on
:data:`HANGING_INPUT`. Each test is named after the attack and asserts what a user sees: the
version served, the REST answers, the reason in the event and the status reply.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from agent.service.core import RESTART_EXIT_CODE
from edgefleet.signing import generate_keypair, load_private_key
from edgefleet.testing.artifacts import build_artifact
from edgefleet.testing.broker import free_port
from edgefleet.testing.waiting import wait_for
from edgefleet.topics import device_cmd_topic, device_topic, response_topic
from tests.integration.service_support import (
    HANGING_INPUT,
    AgentProcess,
    Observer,
    agent_config,
    build_hanging_model,
    command,
    http_json,
)
from tests.support.models import OTA_MODELS

CLF, HANG = "/v1/models/clf:predict", "/v1/models/hang:predict"
QUICK = [[0.1, 0.2, 0.3, 0.4]]
FRAME = np.random.default_rng(5).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32).tolist()
FINAL = ("committed", "rejected", "failed", "rolled_back")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory):
    key_path, pub_path = generate_keypair(tmp_path_factory.mktemp("keys"))
    return load_private_key(key_path), pub_path


def build_models(tmp: Path, key) -> dict:
    """v1 (a classifier), v2 (another one) and the hanging v2 with a long or a short probation."""
    tmp.mkdir(parents=True, exist_ok=True)
    hanging = build_hanging_model(tmp / "hang.tflite")

    def hang(version: str, probation: dict) -> object:
        # Golden samples are uniform in [-1, 1]: the quick inputs, so validation passes.
        return build_artifact(hanging, tmp / f"hang-v{version}-{probation['seconds']}", name="hang", version=version,
                              key=key, golden_samples=2, new_contract=True, probation=probation)

    return {
        "v1": build_artifact(OTA_MODELS / "clf_a.tflite", tmp / "v1", version="1", key=key, golden_samples=1),
        "v2": build_artifact(OTA_MODELS / "clf_a2.tflite", tmp / "v2", version="2", key=key, golden_samples=1,
                             probation={"inferences": 10, "seconds": 60}),
        # Long probation: only a hang can end it early.
        "hang_probation": hang("2", {"inferences": 1000, "seconds": 120}),
        # Short probation with quick traffic: it commits, and hangs later.
        "hang_later": hang("2", {"inferences": 3, "seconds": 30}),
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, keys):
    return build_models(tmp_path_factory.mktemp("probation-arts"), keys[0])


class Agent:
    """A real ``edge-agent run`` with REST, a trusted key and a 0.5 s per-call deadline."""

    def __init__(self, broker, tmp: Path, device: str, v1, pub: Path, env: dict[str, str] | None = None) -> None:
        self.device, self.port, self.env = device, free_port(), env
        self.cfg = agent_config(tmp, broker.url, device_id=device, model=v1.dir, trusted_keys=[str(pub)],
                                http={"listen": f"127.0.0.1:{self.port}"}, inference={"deadline_s": 0.5})
        self.tmp = tmp
        self.obs = Observer(broker.port, topic=device_topic(device, "#"))
        self.proc = self.start(env)

    def start(self, env: dict[str, str] | None = None) -> AgentProcess:
        proc = AgentProcess(self.tmp, self.cfg, env=env).start()
        wait_for(lambda: self.predict(CLF, FRAME)[0] == 200, 60, what="the agent serving v1")
        return proc

    def predict(self, path: str, instances, timeout: float = 10.0) -> tuple[int, object]:
        try:
            return http_json(self.port, "POST", path, {"instances": instances}, timeout=timeout)
        except OSError:
            return 0, None

    def send(self, name: str, cmd: dict, timeout: float = 20.0) -> dict:
        self.obs.publish(device_cmd_topic(self.device, name), cmd)
        return wait_for(lambda: next((b for b in self.obs.on(response_topic(self.device, name))
                                      if b.get("id") == cmd["id"]), None), timeout, what=f"reply to {name}")

    def update(self, art, rollout_id: str) -> None:
        reply = self.send("update", command("update", **art.update_fields(rollout_id=rollout_id)))
        assert reply["ok"], reply

    def event(self, rollout_id: str, states=FINAL, timeout: float = 60.0) -> dict:
        return wait_for(lambda: next((b for b in self.obs.on(f"{self.device}/events")
                                      if b.get("rollout_id") == rollout_id and b.get("state") in states), None),
                        timeout, what=f"{rollout_id} in {states}")

    def status(self) -> dict:
        return self.send("status", command("status"))["result"]

    def close(self) -> None:
        self.obs.close()
        self.proc.stop_quietly()


def poison(agent: Agent) -> threading.Thread:
    """One REST request with the input the model hangs on, from a thread (it never gets an answer)."""
    thread = threading.Thread(target=agent.predict, args=(HANG, HANGING_INPUT, 120.0), daemon=True)
    thread.start()
    return thread


def test_model_hanging_on_one_input_is_rolled_back_and_serving_resumes(broker, models, keys, tmp_path):
    agent = Agent(broker, tmp_path, "pi-hang-prob", models["v1"], keys[1])
    try:
        agent.update(models["hang_probation"], "r-hang")
        agent.event("r-hang", ("probation",))
        assert agent.predict(HANG, QUICK)[0] == 200, "v2 answers quick inputs on probation"
        poison(agent)
        final = agent.event("r-hang", timeout=30)
        assert final["state"] == "rolled_back", final
        assert "stuck past the 0.5 s deadline during probation" in final["reason"]
        assert final["probation"]["stuck"] == 1
        t0 = time.monotonic()
        wait_for(lambda: agent.predict(CLF, FRAME)[0] == 200, 5, what="v1 answering again")
        assert time.monotonic() - t0 < 5.0
        status = agent.status()
        assert status["ota"]["active"]["version"] == "1" and status["ota"]["serving"]["version"] == "1"
        assert status["ota"]["last"]["state"] == "rolled_back"
    finally:
        agent.close()


def commit_then_hang(agent: Agent, art, rollout_id: str) -> int:
    """Commit ``art`` on quick traffic, then send the input it hangs on; the agent's exit status."""
    agent.update(art, rollout_id)
    agent.event(rollout_id, ("probation",))
    for _ in range(3):
        assert agent.predict(HANG, QUICK)[0] == 200
    assert agent.event(rollout_id)["state"] == "committed"
    wait_for(lambda: agent.status()["ota"]["active"]["version"] == "2", 10, what="v2 committed")
    poison(agent)  # after the commit: probation is over
    return agent.proc.proc.wait(30)  # 3 x the 0.5 s deadline, then a stop


def restarted_on_the_previous_model(agent: Agent, rollout_id: str) -> dict:
    """Start the agent again, as systemd would; it must serve v1 and say why. Returns the OTA status."""
    agent.proc = agent.start()
    assert agent.predict(CLF, FRAME)[0] == 200, "the previous kept model serves"
    status = agent.status()["ota"]
    assert status["active"]["version"] == "1" and status["serving"]["version"] == "1"
    assert "the last run gave up a hung model: version 2 hung" in status["boot_error"]
    assert status["last"]["state"] == "rolled_back" and "hung after its commit" in status["last"]["reason"]
    assert status["kept"] == [] and status["floor"] == "2"
    rolled = agent.event(rollout_id, ("rolled_back",))
    assert "restarting onto the previous kept version 1" in rolled["reason"]
    assert not any(p.name.startswith("hang-v2") for p in (agent.tmp / "state" / "ota" / "slots").iterdir())
    return status


def test_committed_model_that_later_hangs_is_replaced_by_the_previous_kept_model(broker, models, keys, tmp_path):
    agent = Agent(broker, tmp_path, "pi-hang-late", models["v1"], keys[1])
    try:
        code = commit_then_hang(agent, models["hang_later"], "r-late")
        assert code == RESTART_EXIT_CODE, agent.proc.log()[-3000:]
        gave_up = [b for b in agent.obs.on(f"{agent.device}/events") if b.get("event") == "model_error"]
        assert gave_up and "version 2 hung after its commit" in gave_up[0]["reason"]
        restarted_on_the_previous_model(agent, "r-late")
        # The hung model cannot come back: its captured signed update is below the floor now.
        replay = agent.send("update", command("update", **models["hang_later"].update_fields(rollout_id="r-again")))
        assert replay["ok"] is False and "anti-downgrade floor" in replay["error"]
        assert agent.predict(CLF, FRAME)[0] == 200
    finally:
        agent.close()


def test_wrong_shape_requests_during_probation_do_not_roll_back_a_good_update(broker, models, keys, tmp_path):
    agent = Agent(broker, tmp_path, "pi-shape", models["v1"], keys[1])
    try:
        agent.update(models["v2"], "r-good")
        agent.event("r-good", ("probation",))
        for i in range(12):
            wrong = agent.predict(CLF, [[1.0, 2.0, 3.0]])  # a client sending the wrong shape
            assert wrong[0] == 400, wrong
            if i < 10:
                assert agent.predict(CLF, FRAME)[0] == 200
        final = agent.event("r-good", timeout=30)
        assert final["state"] == "committed", final
        assert final["probation"]["input_errors"] >= 10 and final["probation"]["errors"] == 0
        assert agent.status()["ota"]["serving"]["version"] == "2"
    finally:
        agent.close()
