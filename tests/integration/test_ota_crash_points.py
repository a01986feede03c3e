"""Kill a real agent process (os._exit(137), like kill -9 or a power cut) at every named OTA step.

For each crash point in agent.ota.crashpoints.CRASH_POINTS a child process
(``python -m tests.support.ota_driver``: OtaManager + ModelHost + live traffic, no MQTT) installs
v1 and starts the update with ``EDGEFLEET_CRASH_AT=<point>``; it must die with 137 there (so the
point is really reached). A second process then boots on the same state_dir and must come up
serving a valid committed model (never a partial file), finish or undo the interrupted update as
documented in docs/ota.md, leave no orphan slot or staging directory, and report the outcome.

The boot-time points need a state to boot from, made by a first run (:data:`BEFORE`): an update
killed while validating (the boot counter), a committed v2 with its journal then damaged (the
journal rebuild). ``hung-recorded`` needs a committed model that hangs, so it runs the real agent
(``edge-agent run``, a private broker) with a real hanging model instead of the driver.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.ota.crashpoints import CRASH_POINTS, ENV_VAR
from edgefleet.signing import generate_keypair, load_private_key
from edgefleet.testing.artifacts import build_artifact
from edgefleet.testing.http_server import ArtifactServer
from tests.support.models import OTA_MODELS

REPO = Path(__file__).resolve().parents[2]

# point -> (artifact, final state of the rollout, version served after recovery)
EXPECTED = {
    "journal-set-aside": ("v2", "committed", "2"),      # the damaged journal is still there: rebuilt again
    "journal-rebuilt": ("v2", "committed", "2"),        # the rebuilt journal serves
    "boot-counted": ("v2", "committed", "2"),           # the second boot in validating: resumed once more
    "queued": ("v2", "committed", "2"),                 # resumed
    "download-partial": ("v2", "committed", "2"),       # resumed with a Range request
    "downloaded": ("v2", "committed", "2"),
    "verified": ("v2", "committed", "2"),
    "validated": ("v2", "committed", "2"),
    "slot-moved": ("v2", "rolled_back", "1"),           # undone: the new model may have killed us
    "slot-partial": ("v2", "rolled_back", "1"),
    "slot-written": ("v2", "rolled_back", "1"),
    "activated": ("v2", "rolled_back", "1"),
    "probation": ("v2", "rolled_back", "1"),
    "commit-before-journal": ("v2", "rolled_back", "1"),
    "commit-after-journal": ("v2", "committed", "2"),   # the journal already said committed
    "rollback-reverted": ("bad", "rolled_back", "1"),
    "operator-rollback": ("v2", "committed", "1"),      # the rollback command is finished
    "hung-recorded": ("hang", "rolled_back", "1"),      # the record was written: the previous model serves
}
BEFORE = {"boot-counted": "crash-in-validation", "journal-set-aside": "damaged-journal",
          "journal-rebuilt": "damaged-journal"}
"""Boot-time points: the state the crashing run boots from."""


def test_every_crash_point_has_an_expectation():
    assert list(EXPECTED) == list(CRASH_POINTS), "the same points, in the same order"


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


def prepare(tmp: Path, setup, before: str) -> None:
    """The state a boot-time crash point is reached from."""
    if before == "crash-in-validation":
        rc, err = run_driver(tmp, setup, "validated", "v2", False)
        assert rc == 137, err
    else:
        rc, err = run_driver(tmp, setup, None, "v2", False)
        assert rc == 0, err
        (tmp / "state" / "journal.json").write_text('{"active": "clf-v9-', encoding="utf-8")  # bit rot


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_agent_killed_at_crash_point_restarts_on_a_committed_model(point, setup, tmp_path, request):
    art, final_state, serving = EXPECTED[point]
    if point == "hung-recorded":
        hung_model_recorded_then_killed(request.getfixturevalue("broker"), tmp_path)
        return
    rollback = point == "operator-rollback"
    if point in BEFORE:
        prepare(tmp_path, setup, BEFORE[point])
    rc, err = run_driver(tmp_path, setup, point, None if point in BEFORE else art, rollback)
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
    terminal = [e for e in events if e.get("rollout_id") == rollout
                and e["state"] in ("committed", "rejected", "failed", "rolled_back")]
    assert terminal and terminal[-1]["state"] == final_state, events
    if final_state == "rolled_back" and point != "rollback-reverted":
        assert "restarted during" in terminal[-1]["reason"]
    if BEFORE.get(point) == "damaged-journal":
        assert (tmp_path / "state" / "journal.json.damaged").is_file()
        assert any(e.get("event") == "model_error" and "rebuilt from 2 verified slot(s)" in e["reason"]
                   for e in events), "the damage was reported"
    if point == "download-partial":
        ranges = [r for r in setup["server"].requests_for("/v2/model.tflite") if r]
        assert ranges, "the second process should resume the partial download with a Range request"


def hung_model_recorded_then_killed(broker, tmp: Path) -> None:
    """A committed model hangs; the agent dies right after writing the record; the restart serves v1."""
    from tests.integration.test_probation_attacks import (
        Agent,
        build_models,
        commit_then_hang,
        restarted_on_the_previous_model,
    )

    key_path, pub_path = generate_keypair(tmp / "keys")
    models = build_models(tmp / "arts", load_private_key(key_path))
    agent = Agent(broker, tmp / "agent", "pi-crash-hung", models["v1"], pub_path, env={ENV_VAR: "hung-recorded"})
    try:
        assert commit_then_hang(agent, models["hang_later"], "r-hung") == 137, agent.proc.log()[-3000:]
        restarted_on_the_previous_model(agent, "r-hung")
    finally:
        agent.close()
