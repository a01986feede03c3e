"""``edge-fleet serve`` as it runs for a team: real Mosquitto, a private PostgreSQL, controllers as processes.

Commands are counted at the simulated devices (``Simulator.received``), so "no duplicate
commands" is what the devices saw, not what the controller believes it sent.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from edgefleet.messages import ExecState, decode
from edgefleet.mqtt import connect
from edgefleet.signing import generate_keypair, load_public_key
from edgefleet.statements import verify_statement
from edgefleet.testing.broker import free_port
from edgefleet.testing.simulator import Simulator
from edgefleet.testing.waiting import wait_for
from edgefleet.topics import all_devices
from fleet.store import open_store
from tests.fleet import conftest as fleet_fixtures
from tests.fleet.conftest import REPO, make_artifact, run_cli

# the private PostgreSQL of the fleet tests (one cluster per session, a database per test);
# `broker` is the session's private Mosquitto (tests/conftest.py)
postgres_server = fleet_fixtures.postgres_server
pg_url = fleet_fixtures.pg_url

TOKEN = "t0ken-for-tests-0123456789abcdef"
_UNANSWERED = (ExecState.QUEUED, ExecState.SENT)


@pytest.fixture()
def token_file(tmp_path) -> str:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return str(path)


class Controller:
    """One ``edge-fleet serve`` process; ``url`` and ``controller_id`` from its ready line."""

    def __init__(self, state: str, broker_url: str, token_file: str, workdir: Path, *extra: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / "controller.log"
        self.args = [sys.executable, "-m", "fleet.cli", "serve", "--state", state, "--broker", broker_url,
                     "--token-file", token_file, "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
                     "--serve", "127.0.0.1:0", "--data-dir", str(workdir), "--metrics-refresh", "0.5", *extra]
        self.start()

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.args, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("ready:"):
            self.proc.wait(10)
            raise AssertionError(f"controller did not start ({self.proc.returncode}): {line}{self.log.read_text()}")
        words = line.split()
        self.controller_id = words[words.index("controller") + 1]
        self.url = words[words.index("api") + 1]
        self.metrics = words[words.index("metrics") + 1]

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture()
def controllers():
    started: list[Controller] = []
    yield started
    for c in started:
        c.stop()


def _sim(broker, prefix, n=6, **kw) -> Simulator:
    kw.setdefault("step_delay", 0.05)
    return Simulator(broker.url, count=n, prefix=prefix, group=prefix, **kw)


def _client(ctl: Controller, token_file: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, "--controller", ctl.url, "--token-file", token_file)


def _status(ctl: Controller, token_file: str, rollout_id: str) -> dict:
    r = _client(ctl, token_file, "status", rollout_id, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _submit(ctl: Controller, token_file: str, art: Path, group: str, *extra: str) -> str:
    r = _client(ctl, token_file, "deploy", str(art), "--group", group, "--json", *extra)
    assert r.returncode == 0, r.stdout + r.stderr
    return str(json.loads(r.stdout)["rollout_id"])


def _updates(sim: Simulator) -> dict[str, list[str]]:
    return {d: [cid for name, cid in got if name == "update"] for d, got in sim.received.items()}


def _mid_wave(state: str):
    """(rollout id, devices that answered) once a wave after the canary has devices working."""
    def check():
        store = open_store(state)
        try:
            latest = store.latest()
            if latest is None:
                return None
            execs = store.executions(latest.id)
            working = [e for e in execs if e.wave >= 1 and e.state is ExecState.IN_PROGRESS]
            return working and (latest.id, {e.device_id for e in execs if e.state not in _UNANSWERED})
        finally:
            store.close()
    return check


def _kill_mid_wave_and_finish(state: str, broker, token_file, tmp_path, controllers, prefix: str,
                              restart_same: bool) -> None:
    """The driving controller dies (-9) mid-wave; the rollout still finishes with no duplicate update."""
    art = make_artifact(tmp_path / "v2", "2")
    first = Controller(state, broker.url, token_file, tmp_path / "a")
    controllers.append(first)
    if not restart_same:
        controllers.append(Controller(state, broker.url, token_file, tmp_path / "b"))
    with _sim(broker, prefix, n=10, step_delay=0.3) as sim:
        rollout_id = _submit(first, token_file, art, prefix, "--canary", "2", "--wave-base", "3",
                             "--device-timeout", "60")
        found, answered = wait_for(_mid_wave(state), 40, interval=0.1, what="a wave after the canary to be working")
        assert found == rollout_id
        first.kill()
        killed = time.monotonic()
        if restart_same:
            first.start()  # the same command line: it adopts the rollout of its dead predecessor

        def adopted():
            store = open_store(state)
            try:
                return store.lease(rollout_id).driver not in (None, first.controller_id)
            finally:
                store.close()
        wait_for(adopted, 15, interval=0.1, what="another controller to take the rollout over")
        assert time.monotonic() - killed <= 15
        survivor = controllers[-1]
        final = wait_for(lambda: (s := _status(survivor, token_file, rollout_id))["state"] != "IN_PROGRESS" and s,
                         90, interval=0.5, what="the rollout to end")
        assert final["state"] == "SUCCEEDED", final
        assert set(sim.versions().values()) == {"2"}
        for device, ids in _updates(sim).items():
            assert len(set(ids)) == 1, f"{device} got {len(set(ids))} different update ids"
            if device in answered:
                assert len(ids) == 1, f"{device} had answered before the kill and was sent the update again"


def test_a_submitted_rollout_completes_after_the_client_exits(broker, token_file, tmp_path, controllers):
    art = make_artifact(tmp_path / "v2", "2")
    ctl = Controller(f"sqlite:///{tmp_path / 'fleet.db'}", broker.url, token_file, tmp_path / "ctl")
    controllers.append(ctl)
    with _sim(broker, "sub", n=6, step_delay=0.1, telemetry_interval=0.5) as sim:
        t0 = time.monotonic()
        r = _client(ctl, token_file, "deploy", str(art), "--group", "sub", "--canary", "1", "--wave-base", "2")
        assert r.returncode == 0, r.stderr
        assert "submitted to" in r.stdout and time.monotonic() - t0 < 10, "returns at once"
        rollout_id = r.stdout.split()[1]
        final = wait_for(lambda: (s := _status(ctl, token_file, rollout_id))["state"] != "IN_PROGRESS" and s,
                         60, interval=0.3, what="the rollout to end with nobody waiting")
        assert final["state"] == "SUCCEEDED" and final["counts"]["SUCCEEDED"] == 6
        assert set(sim.versions().values()) == {"2"}
        assert sim.downloads == 0  # (the simulator does not download unless asked)
        listing = json.loads(_client(ctl, token_file, "status", "--json").stdout)
        assert [r["rollout_id"] for r in listing] == [rollout_id]
        watch = _client(ctl, token_file, "watch", "--group", "sub", "--frames", "1")
        assert watch.returncode == 0 and "fleet: 6 devices, 6 online" in watch.stdout, watch.stdout + watch.stderr
        story = _client(ctl, token_file, "status", rollout_id, "--device", "sub-00000")
        assert story.returncode == 0 and "SUCCEEDED" in story.stdout
        waited = _client(ctl, token_file, "rollback", "--group", "sub", "--wait", "--json")
        assert waited.returncode == 0, waited.stderr
        assert json.loads(waited.stdout)["state"] == "SUCCEEDED" and set(sim.versions().values()) == {"1"}


def test_a_controller_with_a_sign_key_signs_each_devices_rollback_statement(broker, token_file, tmp_path,
                                                                             controllers):
    # without the fleet key a device refuses to go below its anti-downgrade floor (docs/security.md)
    key, pub = generate_keypair(tmp_path / "keys")
    ctl = Controller(f"sqlite:///{tmp_path / 'fleet.db'}", broker.url, token_file, tmp_path / "ctl",
                     "--sign-key", str(key))
    controllers.append(ctl)
    seen: list[tuple[str, dict]] = []
    watcher = connect(broker.url, client_id="statement-watcher",
                      on_message=lambda m: seen.append((m.topic, decode(m.payload))))
    watcher.subscribe([all_devices("cmd/rollback")])
    try:
        with _sim(broker, "sig", n=3) as sim:
            rollout_id = _submit(ctl, token_file, make_artifact(tmp_path / "v2", "2"), "sig")
            wait_for(lambda: _status(ctl, token_file, rollout_id)["state"] == "SUCCEEDED", 60, interval=0.3,
                     what="the deploy of v2")
            r = _client(ctl, token_file, "rollback", "--group", "sig", "--to", "1", "--wait", "--json")
            assert r.returncode == 0, r.stderr
            assert set(sim.versions().values()) == {"1"}
    finally:
        watcher.close()
    assert len(seen) == 3
    for topic, cmd in seen:
        device = topic.split("/")[3]
        st = verify_statement(cmd["statement"], cmd["statement_signature"], [load_public_key(pub)],
                              kind="rollback", device_id=device, group="sig", now=time.time())
        assert st.version == "1" and st.device == device


def test_two_controllers_on_postgres_the_driver_killed_mid_wave_the_other_finishes(
        broker, pg_url, token_file, tmp_path, controllers):
    _kill_mid_wave_and_finish(pg_url, broker, token_file, tmp_path, controllers, "ha", restart_same=False)


def test_one_controller_on_sqlite_restarted_resumes_by_itself(broker, token_file, tmp_path, controllers):
    _kill_mid_wave_and_finish(f"sqlite:///{tmp_path / 'fleet.db'}", broker, token_file, tmp_path, controllers,
                              "rs", restart_same=True)


def test_a_second_rollout_on_a_busy_group_is_refused_unless_forced(broker, token_file, tmp_path, controllers):
    v2, v3 = make_artifact(tmp_path / "v2", "2"), make_artifact(tmp_path / "v3", "3")
    ctl = Controller(f"sqlite:///{tmp_path / 'fleet.db'}", broker.url, token_file, tmp_path / "ctl")
    controllers.append(ctl)
    with _sim(broker, "busy", n=4, outcomes={"2": "silent"}) as sim:
        # the canary never answers: the rollout stays busy until its device times out (4 s)
        first = _submit(ctl, token_file, v2, "busy", "--canary", "1", "--device-timeout", "4")
        refused = _client(ctl, token_file, "deploy", str(v3), "--group", "busy")
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
        assert f"group 'busy' already has rollout {first} IN_PROGRESS" in refused.stderr
        assert "--force" in refused.stderr
        second = _submit(ctl, token_file, v3, "busy", "--force", "--canary", "0", "--device-timeout", "30")
        done = wait_for(lambda: (s := _status(ctl, token_file, first))["state"] == "ABORTED" and s, 20,
                        interval=0.3, what="the first rollout to be canceled")
        assert done["reason"] == f"canceled by rollout {second} (--force)"
        assert done["counts"]["CANCELED"] == 3 and done["rolled_back"] == 0, "unsent waves canceled, nothing rolled back"
        final = wait_for(lambda: (s := _status(ctl, token_file, second))["state"] != "IN_PROGRESS" and s, 30,
                         interval=0.3, what="the forced rollout to end")
        assert final["state"] == "SUCCEEDED", final
        assert set(sim.versions().values()) == {"3"}


def test_bad_input_is_one_line_and_the_controller_keeps_serving(broker, token_file, tmp_path, controllers):
    ctl = Controller(f"sqlite:///{tmp_path / 'fleet.db'}", broker.url, token_file, tmp_path / "ctl")
    controllers.append(ctl)
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token-0123456789\n")
    r = run_cli("status", "--controller", ctl.url, "--token-file", str(wrong))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "bad or missing token" in r.stderr, r.stderr
    dead = f"http://127.0.0.1:{free_port()}"
    r = run_cli("status", "--controller", dead, "--token-file", token_file)
    assert r.returncode == 4 and r.stderr.startswith(f"error: controller {dead} does not answer"), r.stderr
    req = urllib.request.Request(ctl.url + "/v1/nothing", headers={"Authorization": f"Bearer {TOKEN}"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=5)
    assert err.value.code == 404 and "unknown request GET /v1/nothing" in json.loads(err.value.read())["error"]
    bad = urllib.request.Request(ctl.url + "/v1/rollouts", data=b"{not json", method="POST",
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(bad, timeout=5)
    assert err.value.code == 400
    r = _client(ctl, token_file, "status", "r-nope")
    assert r.returncode == 2 and "unknown rollout 'r-nope'" in r.stderr
    r = _client(ctl, token_file, "deploy", str(make_artifact(tmp_path / "v2", "2")), "--group", "nobody")
    assert r.returncode == 2 and "unknown group 'nobody'" in r.stderr
    assert ctl.proc.poll() is None
    with urllib.request.urlopen(ctl.url + "/v1/health", timeout=5) as resp:
        assert json.loads(resp.read())["ok"] is True


def test_a_database_that_is_unreachable_or_older_stops_serve_with_one_line(broker, postgres_server, token_file):
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/x"
    r = run_cli("serve", "--state", url, "--broker", broker.url, "--token-file", token_file, "--listen", "127.0.0.1:0",
                "--metrics", "off")
    assert r.returncode == 4 and r.stderr.count("\n") == 1 and "unreachable" in r.stderr, r.stderr
    fresh = postgres_server.create_database("never_migrated")
    r = run_cli("status", "--state", fresh)
    assert r.returncode == 2 and "run `edge-fleet migrate --state URL`" in r.stderr, r.stderr
    assert run_cli("migrate", "--state", fresh).returncode == 0
    assert run_cli("status", "--state", fresh).returncode == 0


def test_a_database_outage_pauses_the_rollout_and_it_resumes(broker, postgres_server, pg_url, token_file, tmp_path,
                                                            controllers):
    art = make_artifact(tmp_path / "v2", "2")
    ctl = Controller(pg_url, broker.url, token_file, tmp_path / "ctl")
    controllers.append(ctl)
    with _sim(broker, "out", n=8, step_delay=0.3) as sim:
        rollout_id = _submit(ctl, token_file, art, "out", "--canary", "2", "--wave-base", "6",
                             "--device-timeout", "120")
        wait_for(lambda: sim.commands_received >= 1, 20, what="the canary to be sent")
        postgres_server.stop()
        try:
            time.sleep(3.0)  # the canary finishes meanwhile; its answers cannot be written
            sent_while_down = sim.commands_received
            time.sleep(2.0)
            assert sim.commands_received == sent_while_down == 2, "nothing is sent that is not recorded first"
            r = _client(ctl, token_file, "status", rollout_id)
            assert r.returncode == 4 and "state database" in r.stderr, r.stderr
        finally:
            postgres_server.start()
        final = wait_for(lambda: (s := _status(ctl, token_file, rollout_id))["state"] != "IN_PROGRESS" and s, 60,
                         interval=0.5, what="the rollout to resume and end")
        assert final["state"] == "SUCCEEDED", final
        assert set(sim.versions().values()) == {"2"}
        assert all(len(ids) == 1 for ids in _updates(sim).values())
