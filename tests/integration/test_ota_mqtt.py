"""One signed update and one rollback end to end: MQTT command -> real `edge-agent run` -> events and state.

The agent has no inference source here, so probation commits on its golden-sample evidence at
the manifest's time limit (see docs/ota.md, "No traffic").
"""

from __future__ import annotations

from pathlib import Path

from edgefleet.signing import generate_keypair, load_private_key
from edgefleet.statements import make_statement
from edgefleet.testing.artifacts import build_artifact
from edgefleet.testing.http_server import ArtifactServer
from edgefleet.testing.waiting import wait_for
from edgefleet.topics import device_cmd_topic
from tests.integration.service_support import AgentProcess, Observer, agent_config, command
from tests.support.models import OTA_MODELS


def test_signed_update_then_rollback_over_mqtt(broker, tmp_path: Path):
    key_path, pub_path = generate_keypair(tmp_path / "keys")
    key = load_private_key(key_path)
    v1 = build_artifact(OTA_MODELS / "clf_a.tflite", tmp_path / "v1", version="1", key=key, golden_samples=2)
    v2 = build_artifact(OTA_MODELS / "clf_a2.tflite", tmp_path / "v2", version="2", key=key, golden_samples=2,
                        probation={"inferences": 10, "seconds": 1})
    agent = AgentProcess(tmp_path / "agent", agent_config(tmp_path, broker.url, device_id="ota-1", model=v1.dir,
                                                          trusted_keys=[str(pub_path)]))
    obs = Observer(broker.port, topic="edgefleet/v1/devices/ota-1/#")
    with ArtifactServer() as http:
        url = http.add("/v2/model.tflite", v2.model_path.read_bytes())
        agent.start()
        try:
            wait_for(lambda: any(s.get("online") and (s.get("model") or {}).get("version") == "1"
                                 for s in obs.on("/state")), 30, what="agent online with v1")

            obs.publish(device_cmd_topic("ota-1", "update"), command("update", **v2.update_fields(url, "roll-1")))

            def ota(rollout: str) -> list[dict]:
                return [e for e in obs.on("/events") if e.get("event") == "ota" and e.get("rollout_id") == rollout]

            wait_for(lambda: any(e["state"] == "committed" for e in ota("roll-1")), 30,
                     what=f"committed event; agent log:\n{agent.log()[-2000:]}")
            states = [e["state"] for e in ota("roll-1")]
            assert states == ["queued", "downloading", "verifying", "validating", "installing", "probation",
                              "committed"], states
            wait_for(lambda: (obs.on("/state")[-1].get("model") or {}).get("version") == "2", 10,
                     what="retained state showing v2")
            reply = wait_for(lambda: obs.on("/cmd/update/response"), 5, what="update reply")
            assert reply[-1]["ok"] is True

            # v1 is below the anti-downgrade floor (2): an unsigned rollback is refused, a signed one works.
            obs.publish(device_cmd_topic("ota-1", "rollback"), command("rollback", to=None, rollout_id="rb-0"))
            refused = wait_for(lambda: [e for e in ota("rb-0") if e["state"] == "failed"], 20, what="refusal")
            assert "signed rollback statement" in refused[-1]["reason"]
            statement, signature = make_statement("rollback", key, group="g1", version="1")  # agent_config's group
            obs.publish(device_cmd_topic("ota-1", "rollback"), command("rollback", to=None, rollout_id="rb-1",
                                                                       statement=statement,
                                                                       statement_signature=signature))
            done = wait_for(lambda: [e for e in ota("rb-1") if e["state"] == "committed"], 20, what="rollback")
            assert done[-1]["version"] == "1" and done[-1]["rollback"] is True
            wait_for(lambda: (obs.on("/state")[-1].get("model") or {}).get("version") == "1", 10,
                     what="retained state showing v1 again")
        finally:
            agent.stop_quietly()
            obs.close()
