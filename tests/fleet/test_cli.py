"""``edge-fleet`` as an operator runs it: a real private Mosquitto, simulated devices, the CLI as a process."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from edgefleet.messages import ExecState
from edgefleet.signing import generate_keypair
from edgefleet.testing.simulator import Simulator
from edgefleet.testing.waiting import wait_for
from fleet.store import Store
from tests.fleet.conftest import REPO, make_artifact, run_cli

FAST = ["--serve", "127.0.0.1:0", "--device-timeout", "20"]
_UNANSWERED = (ExecState.QUEUED, ExecState.SENT)


@pytest.fixture()
def data(tmp_path):
    return str(tmp_path / "data")


def _sim(broker, prefix, n=5, **kw) -> Simulator:
    kw.setdefault("step_delay", 0.01)
    return Simulator(broker.url, count=n, prefix=prefix, group=prefix, **kw)


def test_devices_lists_online_and_offline_devices_from_retained_state(fleet_broker):
    with _sim(fleet_broker, "lst", n=3, telemetry_interval=0.2) as sim:
        off = _sim(fleet_broker, "gone", n=1).start()
        off.stop()  # publishes a retained offline state, like a Last Will would
        wait_for(lambda: sim.devices["lst-00000"].seq > 0, 5, what="telemetry")
        r = run_cli("devices", "--broker", fleet_broker.url, "--json", "--listen", "0.6")
        assert r.returncode == 0, r.stderr
        devices = {d["device_id"]: d for d in json.loads(r.stdout)}
        assert devices["lst-00000"]["last_telemetry_ts"] is not None and devices["gone-00000"]["last_telemetry_ts"] is None
        assert {"lst-00000", "lst-00001", "lst-00002", "gone-00000"} <= set(devices)
        assert devices["lst-00001"]["online"] is True and devices["gone-00000"]["online"] is False
        assert devices["lst-00001"]["model"]["version"] == "1" and devices["lst-00001"]["group"] == "lst"
        assert devices["lst-00001"]["profile"] == "rpi4"
        text = run_cli("devices", "--broker", fleet_broker.url)
        assert "gone-00000  offline" in text.stdout and "online" in text.stdout
    _sim(fleet_broker, "gone", n=1).start().stop(clear=True)


def test_deploy_with_canary_updates_every_device_and_serves_the_model(fleet_broker, tmp_path, data):
    art = make_artifact(tmp_path / "v2", "2")
    with _sim(fleet_broker, "ok", n=8, download=True) as sim:
        r = run_cli("deploy", str(art), "--broker", fleet_broker.url, "--group", "ok", "--canary", "2",
                    "--wave-base", "2", "--wait", "--json", "--data-dir", data, *FAST)
        assert r.returncode == 0, r.stderr
        summary = json.loads(r.stdout)
        assert summary["state"] == "SUCCEEDED" and summary["waves"] == 3  # 2 + 2 + 4
        assert {e["state"] for e in summary["executions"]} == {"SUCCEEDED"}
        assert set(sim.versions().values()) == {"2"}
        assert sim.downloads == 8, "every device fetched the model from the built-in server"
        assert "wave 1/3" in r.stderr and "wave 3/3" in r.stderr, "--wait shows progress as waves advance"
        # the same artifact again: nothing to do, nothing sent
        before = sim.commands_received
        again = run_cli("deploy", str(art), "--broker", fleet_broker.url, "--group", "ok", "--json",
                        "--data-dir", data, *FAST)
        assert again.returncode == 0 and sim.commands_received == before
        status = run_cli("status", summary["rollout_id"], "--json", "--data-dir", data)
        assert json.loads(status.stdout)["counts"]["SUCCEEDED"] == 8


def test_artifact_url_points_devices_at_an_existing_server(fleet_broker, tmp_path, data):
    from fleet.artifacts import ArtifactServer

    art = make_artifact(tmp_path / "v2", "2")
    with ArtifactServer("127.0.0.1:0") as external, _sim(fleet_broker, "ext", n=2, download=True) as sim:
        external.add("/models/demo/2/model.tflite", art / "model.tflite")
        args = ("deploy", str(art), "--broker", fleet_broker.url, "--group", "ext", "--json",
                "--artifact-url", f"{external.base_url}/models/demo/2/", "--data-dir", data)
        missing = run_cli(*args)
        assert missing.returncode == 4 and "host the artifact's manifest.json beside its model" in missing.stderr
        assert sim.commands_received == 0, "refused before anything was sent"
        external.add("/models/demo/2/manifest.json", art / "manifest.json")  # the artifact directory as written
        r = run_cli(*args)
        assert r.returncode == 0, r.stdout + r.stderr
        assert json.loads(r.stdout)["artifact_url"] == f"{external.base_url}/models/demo/2/model.tflite"
        assert sim.downloads == 2 and sim.manifest_fetches == 1, "one manifest fetch serves the whole simulator"
        assert external.served == 4, "the fleet's check, the simulator's manifest, two models"


def test_failures_past_the_threshold_abort_and_roll_back_updated_devices(fleet_broker, tmp_path, data):
    art = make_artifact(tmp_path / "v2", "2")
    bad = {"abt-00004", "abt-00005", "abt-00006"}
    with _sim(fleet_broker, "abt", n=10, outcome_for=lambda d, v: "reject" if d in bad else None) as sim:
        r = run_cli("deploy", str(art), "--broker", fleet_broker.url, "--group", "abt", "--canary", "2",
                    "--wave-base", "5", "--min-executed", "4", "--max-failure-pct", "20", "--json",
                    "--data-dir", data, *FAST)
        assert r.returncode == 1, r.stderr
        summary = json.loads(r.stdout)
        assert summary["state"] == "ABORTED" and "max-failure-pct" in summary["reason"]
        states = {e["device_id"]: e for e in summary["executions"]}
        assert {d for d, e in states.items() if e["state"] == "REJECTED"} == bad
        assert {d for d, e in states.items() if e["state"] == "CANCELED"} == {"abt-00007", "abt-00008", "abt-00009"}
        committed = {d for d, e in states.items() if e["state"] == "SUCCEEDED"}
        assert committed == {"abt-00000", "abt-00001", "abt-00002", "abt-00003"}
        assert all(states[d]["rollback"] == "SUCCEEDED" for d in committed)
        assert set(sim.versions().values()) == {"1"}, "every device is back on the good model"
        story = run_cli("status", summary["rollout_id"], "--device", "abt-00000", "--data-dir", data).stdout
        assert "SUCCEEDED" in story and "rollback_SUCCEEDED" in story and "ABORTING" in story
        assert not any(n == "update" for d in ("abt-00007", "abt-00008", "abt-00009")
                       for n, _ in sim.received.get(d, [])), "canceled waves were never sent"


def test_no_rollback_on_abort_keeps_updated_devices_on_the_new_version(fleet_broker, tmp_path, data):
    art = make_artifact(tmp_path / "v2", "2")
    with _sim(fleet_broker, "keep", n=3, outcome_for=lambda d, v: "rollback" if d == "keep-00001" else None) as sim:
        r = run_cli("deploy", str(art), "--broker", fleet_broker.url, "--device", "keep-00000", "keep-00001",
                    "keep-00002", "--canary", "2", "--no-rollback-on-abort", "--data-dir", data, *FAST)
        assert r.returncode == 1 and "ABORTED" in r.stdout and "rolled_back" in r.stdout
        assert sim.versions() == {"keep-00000": "2", "keep-00001": "1", "keep-00002": "1"}


def test_silent_devices_time_out(fleet_broker, tmp_path, data):
    art = make_artifact(tmp_path / "v2", "2")
    with _sim(fleet_broker, "mute", n=2, outcomes={"*": "silent"}):
        t0 = time.monotonic()
        r = run_cli("deploy", str(art), "--broker", fleet_broker.url, "--group", "mute", "--canary", "1",
                    "--serve", "127.0.0.1:0", "--device-timeout", "1", "--json", "--data-dir", data)
        assert r.returncode == 1
        summary = json.loads(r.stdout)
        assert [e["state"] for e in summary["executions"]] == ["TIMED_OUT", "CANCELED"]
        assert "no final OTA state within 1s" in summary["executions"][0]["reason"]
        assert time.monotonic() - t0 < 15


def test_rollback_command_returns_a_group_to_the_previous_version(fleet_broker, tmp_path, data):
    art = make_artifact(tmp_path / "v2", "2")
    with _sim(fleet_broker, "rb", n=3) as sim:
        assert run_cli("deploy", str(art), "--broker", fleet_broker.url, "--group", "rb", "--canary", "0",
                       "--data-dir", data, *FAST).returncode == 0
        assert set(sim.versions().values()) == {"2"}
        r = run_cli("rollback", "--broker", fleet_broker.url, "--group", "rb", "--wait", "--json",
                    "--data-dir", data)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["state"] == "SUCCEEDED"
        assert set(sim.versions().values()) == {"1"}
        # nothing older is kept: the devices refuse and the tool says so
        again = run_cli("rollback", "--broker", fleet_broker.url, "--device", "rb-00000", "--to", "0.5",
                        "--wait", "--data-dir", data, "--device-timeout", "5")
        assert again.returncode == 1 and "no kept version 0.5" in again.stdout


def test_signing_key_signs_at_deploy_time_for_devices_that_require_signatures(fleet_broker, tmp_path, data):
    key, pub = generate_keypair(tmp_path / "keys")
    art = make_artifact(tmp_path / "v2", "2")
    with _sim(fleet_broker, "sig", n=2, download=True, signed_updates=True, trusted_keys=[pub]) as sim:
        refused = run_cli("deploy", str(art), "--broker", fleet_broker.url, "--group", "sig", "--data-dir", data,
                          *FAST)
        assert refused.returncode == 2 and "require signed updates" in refused.stderr
        assert sim.commands_received == 0
        r = run_cli("deploy", str(art), "--broker", fleet_broker.url, "--group", "sig", "--sign-key", str(key),
                    "--data-dir", data, *FAST)
        assert r.returncode == 0, r.stdout + r.stderr
        assert set(sim.versions().values()) == {"2"}


def test_status_of_an_empty_data_dir_creates_nothing(tmp_path):
    empty = tmp_path / "nothing-here"
    r = run_cli("status", "--data-dir", str(empty))
    assert r.returncode == 0 and "no rollouts" in r.stdout
    r = run_cli("status", "r123", "--data-dir", str(empty))
    assert r.returncode == 2 and "unknown rollout 'r123'" in r.stderr
    assert not empty.exists()


def test_keygen_writes_a_key_pair_and_refuses_to_overwrite(tmp_path):
    r = run_cli("keygen", "--out", str(tmp_path / "k"))
    assert r.returncode == 0 and (tmp_path / "k" / "signing.key").is_file() and (tmp_path / "k" / "signing.pub").is_file()
    again = run_cli("keygen", "--out", str(tmp_path / "k"))
    assert again.returncode == 2 and again.stderr.startswith("error:") and "Traceback" not in again.stderr


def test_watch_prints_frames_with_telemetry_and_fleet_totals(fleet_broker):
    with _sim(fleet_broker, "wat", n=3, telemetry_interval=0.2):
        r = run_cli("watch", "--broker", fleet_broker.url, "--group", "wat", "--frames", "2", "--interval", "0.5")
        assert r.returncode == 0, r.stderr
        assert "\x1b[" not in r.stdout, "plain text when stdout is not a terminal"
        frames = r.stdout.strip().split("\n\n")
        assert len(frames) == 2
        last = frames[-1]
        assert "wat-00002" in last and "demo@1" in last
        row = next(line for line in last.splitlines() if line.startswith("wat-00000")).split()
        assert row[1] == "yes" and float(row[4]) > 0 and row[5] == "6.5" and row[6] == "25"
        assert "fleet: 3 devices, 3 online" in last


def test_export_writes_jsonl_and_csv(fleet_broker, tmp_path):
    with _sim(fleet_broker, "exp", n=2, telemetry_interval=0.2):
        r = run_cli("export", "--broker", fleet_broker.url, "--out", str(tmp_path / "t.jsonl"), "--duration", "1")
        assert r.returncode == 0, r.stderr
        records = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
        kinds = {(rec["device_id"], rec["kind"]) for rec in records}
        assert ("exp-00000", "state") in kinds and ("exp-00001", "telemetry") in kinds
        r = run_cli("export", "--broker", fleet_broker.url, "--out", str(tmp_path / "t.csv"), "--duration", "1")
        assert r.returncode == 0, r.stderr
        rows = list(csv.DictReader((tmp_path / "t.csv").open()))
        assert len(rows) >= 4 and {row["device_id"] for row in rows} >= {"exp-00000", "exp-00001"}
        assert float(rows[0]["p95"]) == 6.5 and rows[0]["model_version"] == "1"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "no temp files left behind"


def test_bad_inputs_are_refused_before_anything_is_sent(fleet_broker, tmp_path, data, capsys):
    from fleet.cli import main

    good = make_artifact(tmp_path / "v2", "2")
    undeployable = make_artifact(tmp_path / "nd", "3", deployable=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    tampered = make_artifact(tmp_path / "tampered", "4")
    (tampered / "model.tflite").write_bytes(b"other bytes")
    with _sim(fleet_broker, "bad", n=2) as sim:
        cases = [
            (["deploy", str(good), "--device", "nope-1"], "unknown device(s): nope-1"),
            (["deploy", str(good), "--group", "nogroup"], "unknown group 'nogroup'"),
            (["deploy", str(broken), "--group", "bad"], "not valid JSON"),
            (["deploy", str(tmp_path / "missing"), "--group", "bad"], "not a directory"),
            (["deploy", str(undeployable), "--group", "bad"], "deployable: false"),
            (["deploy", str(tampered), "--group", "bad"], "model.tflite"),
            (["deploy", str(good)], "no target"),
            (["deploy", str(good), "--group", "bad", "--sign-key", str(tmp_path / "none.key")], "signing key not found"),
            (["deploy", str(good), "--group", "bad", "--canary", "x"], "--canary"),
            (["deploy", str(good), "--group", "bad", "--max-failure-pct", "150"], "--max-failure-pct"),
            (["rollback", "--device", "nope-2"], "unknown device(s): nope-2"),
        ]
        for args, message in cases:  # in-process: the same run_main path, without interpreter start-up
            code = main([*args, "--broker", fleet_broker.url, "--data-dir", data,
                         *(FAST if args[0] == "deploy" else [])])
            err = capsys.readouterr().err
            assert code == 2, (args, err)
            assert err.startswith("error:") and message in err and err.count("\n") == 1, (args, err)
        assert sim.commands_received == 0
        assert not os.path.exists(data), "a refused deploy leaves no rollout behind"
        forced = run_cli("deploy", str(undeployable), "--group", "bad", "--force", "--broker", fleet_broker.url,
                         "--data-dir", data, *FAST)
        assert forced.returncode == 0 and set(sim.versions().values()) == {"3"}


def test_unreachable_broker_is_one_clear_error_naming_the_url(tmp_path, data):
    from edgefleet.testing.broker import free_port

    url = f"mqtt://127.0.0.1:{free_port()}"
    deploy = ["deploy", str(make_artifact(tmp_path / "a", "2")), "--all", "--data-dir", data]
    for args in (["devices"], ["watch", "--frames", "1"], deploy):
        r = run_cli(*args, "--broker", url)
        assert r.returncode == 4 and r.stderr.count("\n") == 1, r.stderr  # 4: could not reach the broker
        assert f"cannot reach MQTT broker {url}" in r.stderr
    bad_scheme = run_cli("devices", "--broker", "http://x")
    assert bad_scheme.returncode == 2 and "expected mqtt://" in bad_scheme.stderr


def test_a_killed_deploy_resumes_without_resending_to_devices_that_answered(fleet_broker, tmp_path, data):
    art = make_artifact(tmp_path / "v2", "2")
    with _sim(fleet_broker, "res", n=6, step_delay=0.4) as sim:
        proc = subprocess.Popen([sys.executable, "-m", "fleet.cli", "deploy", str(art), "--broker", fleet_broker.url,
                                 "--group", "res", "--canary", "2", "--wave-base", "4", "--data-dir", data,
                                 "--serve", "127.0.0.1:0", "--device-timeout", "30"],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

        def canary_answered():
            store = Store.open(data)
            try:
                latest = store.latest()
                answered = [e for e in store.executions(latest.id) if e.state not in _UNANSWERED] if latest else []
                return len(answered) >= 2 and latest.id
            finally:
                store.close()

        rollout_id = wait_for(canary_answered, 20, what="canary devices to answer")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        r = run_cli("status", rollout_id, "--json", "--data-dir", data)
        assert json.loads(r.stdout)["state"] == "IN_PROGRESS"
        r = run_cli("deploy", "--resume", rollout_id, "--broker", fleet_broker.url, "--json", "--data-dir", data,
                    "--serve", "127.0.0.1:0")
        assert r.returncode == 0, r.stderr + r.stdout
        assert json.loads(r.stdout)["state"] == "SUCCEEDED"
        assert set(sim.versions().values()) == {"2"}
        for device, received in sim.received.items():
            updates = [cid for name, cid in received if name == "update"]
            assert len(updates) == 1, f"{device} got the update {len(updates)} times"
        again = run_cli("deploy", "--resume", rollout_id, "--broker", fleet_broker.url, "--data-dir", data)
        assert again.returncode == 2 and "already ended" in again.stderr


def test_a_broker_restart_mid_rollout_is_ridden_out(tmp_path, data):
    from edgefleet.testing.broker import MosquittoBroker

    art = make_artifact(tmp_path / "v2", "2")
    with MosquittoBroker(tmp_path / "broker") as broker, _sim(broker, "bounce", n=6, step_delay=0.3) as sim:
        proc = subprocess.Popen([sys.executable, "-m", "fleet.cli", "deploy", str(art), "--broker", broker.url,
                                 "--group", "bounce", "--canary", "2", "--wave-base", "4", "--json",
                                 "--data-dir", data, "--serve", "127.0.0.1:0", "--device-timeout", "30"],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def canary_started():
            if not os.path.exists(data):
                return False
            store = Store.open(data)
            try:
                latest = store.latest()
                return latest and any(e.state not in _UNANSWERED for e in store.executions(latest.id))
            finally:
                store.close()

        wait_for(canary_started, 20, what="the canary to start")
        broker.restart()  # no persistence: sessions, subscriptions and retained states are gone
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, out + err
        assert json.loads(out)["state"] == "SUCCEEDED"
        assert set(sim.versions().values()) == {"2"}


def test_a_command_the_broker_lost_is_sent_again_and_the_device_installs_once(fleet_broker, tmp_path, data):
    # The simulator ignores the first delivery of lost-00001's update, as if the broker lost it
    # (a node that died before replicating it); the runner re-sends the same id after a quarter
    # of the device timeout, and the device installs it once.
    art = make_artifact(tmp_path / "v2", "2")
    ignored: list[str] = []

    def lose_first(device_id: str, version: str) -> str | None:
        if device_id == "lost-00001" and not ignored:
            ignored.append(device_id)
            return "silent"
        return None

    with _sim(fleet_broker, "lost", n=3, outcome_for=lose_first) as sim:
        r = run_cli("deploy", str(art), "--broker", fleet_broker.url, "--group", "lost", "--canary", "0",
                    "--wave-base", "3", "--json", "--data-dir", data, "--serve", "127.0.0.1:0",
                    "--device-timeout", "12")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["state"] == "SUCCEEDED"
        assert set(sim.versions().values()) == {"2"}
        updates = [cid for name, cid in sim.received["lost-00001"] if name == "update"]
        assert len(updates) == 2 and len(set(updates)) == 1, "sent again with the same id"
        assert ignored == ["lost-00001"]
