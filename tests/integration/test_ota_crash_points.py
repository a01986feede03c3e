"""Kill a real agent process (os._exit(137), like kill -9 or a power cut) at every named OTA step.

For each crash point in agent.ota.crashpoints.CRASH_POINTS a child process
(``python -m tests.support.ota_driver``: OtaManager + ModelHost + live traffic, no MQTT) installs
v1 and starts the update with ``EDGEFLEET_CRASH_AT=<point>``; it must die with 137 there (so the
point is really reached). A second process then boots on the same state_dir and must come up
serving a valid committed model (never a partial file), finish or undo the interrupted update as
documented in docs/ota.md, leave no orphan slot or staging directory, and report the outcome.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.ota.crashpoints import CRASH_POINTS, ENV_VAR
from edgefleet.testing.artifacts import build_artifact
from edgefleet.testing.http_server import ArtifactServer
from tests.support.models import OTA_MODELS

REPO = Path(__file__).resolve().parents[2]

# point -> (artifact, final state of the rollout, version served after recovery)
EXPECTED = {
    "queued": ("v2", "committed", "2"),                 # resumed
    "download-partial": ("v2", "committed", "2"),       # resumed with a Range request
    "downloaded": ("v2", "committed", "2"),
    "verified": ("v2", "committed", "2"),
    "validated": ("v2", "committed", "2"),
    "slot-partial": ("v2", "rolled_back", "1"),         # undone: the new model may have killed us
    "slot-written": ("v2", "rolled_back", "1"),
    "activated": ("v2", "rolled_back", "1"),
    "probation": ("v2", "rolled_back", "1"),
    "commit-before-journal": ("v2", "rolled_back", "1"),
    "commit-after-journal": ("v2", "committed", "2"),   # the journal already said committed
    "rollback-reverted": ("bad", "rolled_back", "1"),
    "operator-rollback": ("v2", "committed", "1"),      # the rollback command is finished
}


def test_every_crash_point_has_an_expectation():
    assert set(EXPECTED) == set(CRASH_POINTS)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("crash-arts")
    v1 = build_artifact(OTA_MODELS / "clf_a.tflite", base / "v1", version="1", golden_samples=1)
    # slow.tflite (107 KB) spans several download chunks, so a crash can leave a real partial file.
    v2 = build_artifact(OTA_MODELS / "slow.tflite", base / "v2", version="2", golden_samples=1,
                        probation={"inferences": 10, "seconds": 5, "min_agreement": 0})
    bad = build_artifact(OTA_MODELS / "clf_b.tflite", base / "bad", version="2", golden_samples=1,
                         probation={"inferences": 40, "seconds": 10})
    with ArtifactServer() as srv:
        urls = {name: srv.add(f"/{name}/model.tflite", art.model_path.read_bytes())
                for name, art in (("v2", v2), ("bad", bad))}
        yield {"v1": v1, "v2": v2, "bad": bad, "urls": urls, "server": srv}


def run_driver(tmp: Path, setup, crash_at: str | None, update: str | None, rollback: bool) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "tests.support.ota_driver", "--state", str(tmp / "state"),
           "--initial", str(setup["v1"].dir), "--events", str(tmp / "events.jsonl"), "--out", str(tmp / "status.json")]
    if update:
        art = setup[update]
        (tmp / "cmd.json").write_text(json.dumps({"id": "r2", **art.update_fields(setup["urls"][update], "r2")}))
        cmd += ["--update", str(tmp / "cmd.json")]
    if rollback:
        cmd.append("--rollback")
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    env["PYTHONPATH"] = str(REPO)
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    if crash_at:
        env[ENV_VAR] = crash_at
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    return proc.returncode, proc.stderr[-3000:]


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_agent_killed_at_crash_point_restarts_on_a_committed_model(point, setup, tmp_path):
    art, final_state, serving = EXPECTED[point]
    rollback = point == "operator-rollback"
    rc, err = run_driver(tmp_path, setup, point, art, rollback)
    assert rc == 137, f"the process did not die at {point!r} (exit {rc}): {err}"

    rc, err = run_driver(tmp_path, setup, None, None, False)
    assert rc == 0, err
    status = json.loads((tmp_path / "status.json").read_text())
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]

    assert status["pending"] is None, status
    assert status["active"]["version"] == serving and status["serving"]["version"] == serving
    assert status["serving"]["sha256"] == status["active_file_sha256"], "served model is not the committed file"
    want_sha = (setup["v1"] if serving == "1" else setup[art]).manifest.model.sha256
    assert status["active_file_sha256"] == want_sha
    assert status["failures"] == [] and status["served"] > 0
    kept = {status["active"]["slot"], *(k["slot"] for k in status["kept"])}
    assert set(status["slots"]) == kept, "orphan or partial slot left behind"
    assert status["staging"] == []

    rollout = "rollback-1" if rollback else "r2"
    terminal = [e for e in events if e["rollout_id"] == rollout
                and e["state"] in ("committed", "rejected", "failed", "rolled_back")]
    assert terminal and terminal[-1]["state"] == final_state, events
    if final_state == "rolled_back" and point != "rollback-reverted":
        assert "restarted during" in terminal[-1]["reason"]
    if point == "download-partial":
        ranges = [r for r in setup["server"].requests_for("/v2/model.tflite") if r]
        assert ranges, "the second process should resume the partial download with a Range request"
