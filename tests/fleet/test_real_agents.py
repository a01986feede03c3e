"""20 real ``edge-agent run`` processes on one private Mosquitto, driven by ``edge-fleet deploy``.

Nothing is simulated: each agent runs the real OTA path (download from the fleet tool's HTTP
server, signature check, validation in a child process, install, probation). A good model rolls
out through a canary and growing waves; a broken one (NaN outputs) is rejected by the canary
devices, the rollout aborts and every device stays on the good model; an operator rollback then
takes all 20 back to the first version.
"""

from __future__ import annotations

import json
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.signing import generate_keypair
from edgefleet.testing.artifacts import build_artifact
from edgefleet.testing.waiting import wait_for
from tests.fleet.conftest import run_cli
from tests.integration.service_support import AgentProcess, agent_config, stop_all
from tests.support.models import OTA_MODELS

pytestmark = [pytest.mark.agents, pytest.mark.timeout(240)]

N_AGENTS = 20
PROBATION = {"inferences": 5, "seconds": 1}


def _versions(broker_url: str) -> dict[str, str | None]:
    r = run_cli("devices", "--broker", broker_url, "--json")
    assert r.returncode == 0, r.stderr
    return {d["device_id"]: (d["model"] or {}).get("version") for d in json.loads(r.stdout)
            if d["online"] and d["group"] == "fa"}


@pytest.fixture(scope="module")
def fleet(fleet_broker, tmp_path_factory):
    base = tmp_path_factory.mktemp("real-fleet")
    key_path, pub_path = generate_keypair(base / "keys")
    from edgefleet.signing import load_private_key

    key: Ed25519PrivateKey = load_private_key(key_path)
    v1 = build_artifact(OTA_MODELS / "clf_a.tflite", base / "v1", version="1", key=key, golden_samples=2,
                        probation=PROBATION)
    agents = []
    for i in range(N_AGENTS):
        device_id = f"fa-{i:02d}"
        cfg = agent_config(base / device_id, fleet_broker.url, device_id=device_id, group="fa", model=v1.dir,
                           trusted_keys=[str(pub_path)], telemetry={"interval_s": 30})
        agents.append(AgentProcess(base / device_id, cfg).start())
    try:
        wait_for(lambda: len(_versions(fleet_broker.url)) == N_AGENTS, 90, interval=1.0,
                 what=f"{N_AGENTS} agents online")
        yield {"base": base, "key_path": key_path, "agents": agents}
    finally:
        stop_all(agents)


def test_rollout_to_20_real_agents_then_a_broken_model_aborts_after_the_canary(fleet, fleet_broker, tmp_path):
    base = fleet["base"]
    v2 = build_artifact(OTA_MODELS / "clf_a2.tflite", base / "v2", version="2", golden_samples=2,
                        probation=PROBATION)
    broken = build_artifact(OTA_MODELS / "nan.tflite", base / "v3", version="3", golden_samples=2,
                            new_contract=True, probation=PROBATION)
    data = str(tmp_path / "data")
    common = ["--broker", fleet_broker.url, "--group", "fa", "--canary", "2", "--wave-base", "6",
              "--sign-key", str(fleet["key_path"]), "--serve", "127.0.0.1:0", "--device-timeout", "60",
              "--json", "--data-dir", data]

    t0 = time.monotonic()
    good = run_cli("deploy", str(v2.dir), *common, timeout=150)
    good_s = time.monotonic() - t0
    assert good.returncode == 0, good.stdout + good.stderr + "\n".join(a.log()[-2000:] for a in fleet["agents"][:2])
    summary = json.loads(good.stdout)
    assert summary["state"] == "SUCCEEDED" and summary["counts"]["SUCCEEDED"] == N_AGENTS
    assert summary["waves"] == 3  # 2 canary + 6 + 12
    wait_for(lambda: set(_versions(fleet_broker.url).values()) == {"2"}, 20, interval=1.0,
             what="every agent reporting version 2")

    t0 = time.monotonic()
    bad = run_cli("deploy", str(broken.dir), *common, timeout=150)
    bad_s = time.monotonic() - t0
    assert bad.returncode == 1, bad.stdout + bad.stderr
    summary = json.loads(bad.stdout)
    assert summary["state"] == "ABORTED" and "canary failed" in summary["reason"]
    states = [e["state"] for e in summary["executions"]]
    assert states[:2] in (["REJECTED", "REJECTED"], ["FAILED", "FAILED"], ["REJECTED", "FAILED"],
                          ["FAILED", "REJECTED"]), summary["executions"][:2]
    assert states[2:] == ["CANCELED"] * (N_AGENTS - 2), "no device past the canary was sent the broken model"
    versions = _versions(fleet_broker.url)
    assert len(versions) == N_AGENTS and set(versions.values()) == {"2"}, versions

    # the operator changes their mind: every device back to the version it ran before (1)
    t0 = time.monotonic()
    # version 1 is below every device's anti-downgrade floor (2): unsigned, the devices refuse it
    unsigned = run_cli("rollback", "--broker", fleet_broker.url, "--group", "fa", "--to", "1", "--wait", "--json",
                       "--device-timeout", "60", "--data-dir", data, timeout=120)
    assert unsigned.returncode == 1 and "anti-downgrade floor" in unsigned.stdout, unsigned.stdout[-2000:]
    assert set(_versions(fleet_broker.url).values()) == {"2"}
    back = run_cli("rollback", "--broker", fleet_broker.url, "--group", "fa", "--to", "1", "--wait", "--json",
                   "--sign-key", str(fleet["key_path"]), "--device-timeout", "60", "--data-dir", data, timeout=120)
    back_s = time.monotonic() - t0
    assert back.returncode == 0, back.stdout + back.stderr
    assert json.loads(back.stdout)["counts"]["SUCCEEDED"] == N_AGENTS
    wait_for(lambda: set(_versions(fleet_broker.url).values()) == {"1"}, 20, interval=1.0,
             what="every agent reporting version 1 after the rollback")
    print(f"\n20 real agents: good rollout {good_s:.1f}s, broken rollout aborted in {bad_s:.1f}s, "
          f"rollback of all {back_s:.1f}s")


def test_unsigned_artifact_is_refused_before_anything_reaches_agents_that_require_signatures(fleet, fleet_broker,
                                                                                             tmp_path):
    unsigned = build_artifact(OTA_MODELS / "clf_a2.tflite", tmp_path / "unsigned", version="9", golden_samples=1)
    before = _versions(fleet_broker.url)
    r = run_cli("deploy", str(unsigned.dir), "--broker", fleet_broker.url, "--group", "fa", "--serve",
                "127.0.0.1:0", "--data-dir", str(tmp_path / "data"), timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "sign" in r.stderr, r.stderr
    assert _versions(fleet_broker.url) == before
