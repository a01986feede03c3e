"""Operators' tools: brokers with a private CA and mutual TLS, secrets kept out of URLs and the
store, passphrase-protected signing keys, ``--json`` on every command, and watch's live table."""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import pty
import re
import signal
import sqlite3
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from edgefleet.mqtt import BrokerAccess
from edgefleet.testing.broker import MosquittoBroker, free_port
from edgefleet.testing.pki import write_ca, write_leaf
from edgefleet.testing.simulator import Simulator
from tests.fleet.conftest import REPO, make_artifact, run_cli

FAST = ["--serve", "127.0.0.1:0", "--device-timeout", "20"]
PASSWORD = "fleet-Pa55-9f1c2e"  # distinctive, so a search of the database cannot miss it


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory):
    """docs/mosquitto/ in small: no anonymous access, a password file, a TLS listener signed by a
    private CA that requires a client certificate. The plain loopback listener (same password
    file) is for the simulated devices."""
    pki = tmp_path_factory.mktemp("pki")
    ca = write_ca(pki, "ca")
    write_ca(pki, "other-ca")
    write_leaf(pki, "broker", ca, server=True)
    write_leaf(pki, "operator", ca, server=False)
    work = tmp_path_factory.mktemp("secure-broker")
    pwfile = work / "passwd"
    pwfile.touch()
    subprocess.run(["mosquitto_passwd", "-b", str(pwfile), "fleet", PASSWORD], check=True, capture_output=True)
    tls_port = free_port()
    user = "user root\n" if os.geteuid() == 0 else ""  # mosquitto as root cannot enter pytest's 0700 dirs
    extra = user + (f"allow_anonymous false\npassword_file {pwfile}\n"
                    f"listener {tls_port} 127.0.0.1\ncafile {pki}/ca.pem\ncertfile {pki}/broker.pem\n"
                    f"keyfile {pki}/broker.key\nrequire_certificate true\n")
    with MosquittoBroker(work, extra_config=extra) as broker:
        yield broker, f"mqtts://fleet@127.0.0.1:{tls_port}", pki


def _devices_url(broker: MosquittoBroker) -> str:
    return f"mqtt://fleet:{PASSWORD}@127.0.0.1:{broker.port}"  # the simulator's own link, not the CLI


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    return {**env, **extra}


def _tls(pki: Path) -> list[str]:
    return ["--ca-file", str(pki / "ca.pem"), "--cert", str(pki / "operator.pem"), "--key", str(pki / "operator.key")]


def test_private_ca_and_client_certificate_broker_is_reachable(secure_broker, tmp_path):
    broker, url, pki = secure_broker
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    with Simulator(_devices_url(broker), count=2, prefix="tls", group="tls", step_delay=0.01):
        r = run_cli("devices", "--json", "--broker", url, "--password-file", str(tmp_path / "pw"), *_tls(pki),
                    env=_env())
        assert r.returncode == 0, r.stderr
        assert {d["device_id"] for d in json.loads(r.stdout)} >= {"tls-00000", "tls-00001"}
        # the same broker without our CA: the system store does not know it
        r = run_cli("devices", "--broker", url, "--password-file", str(tmp_path / "pw"),
                    "--cert", str(pki / "operator.pem"), "--key", str(pki / "operator.key"), env=_env())
        assert r.returncode == 4 and r.stderr.count("\n") == 1 and "certificate verify failed" in r.stderr, r.stderr
        # a CA that did not sign the broker
        r = run_cli("devices", "--broker", url, "--password-file", str(tmp_path / "pw"),
                    *_tls(pki)[2:], "--ca-file", str(pki / "other-ca.pem"), env=_env())
        assert r.returncode == 4 and "certificate verify failed" in r.stderr, r.stderr
        # our CA but no client certificate: the broker requires one
        r = run_cli("devices", "--broker", url, "--password-file", str(tmp_path / "pw"),
                    "--ca-file", str(pki / "ca.pem"), env=_env())
        last = r.stderr.splitlines()[-1]  # after the link's reconnect warnings
        assert r.returncode == 4 and last.startswith("error:") and "client certificate" in last, r.stderr
        # TLS files for a plain broker are a mistake, said at once
        r = run_cli("devices", "--broker", broker.url, "--ca-file", str(pki / "ca.pem"), env=_env())
        assert r.returncode == 2 and "mqtts://" in r.stderr, r.stderr


def test_password_in_the_broker_url_is_refused_and_never_stored(secure_broker, tmp_path, capsys):
    from fleet.cli import main
    from fleet.store import open_store

    broker, url, pki = secure_broker
    with_password = url.replace("fleet@", f"fleet:{PASSWORD}@")
    for args, env in ((["--broker", with_password], {}), ([], {"EDGEFLEET_BROKER": with_password})):
        r = run_cli("devices", *args, *_tls(pki), env=_env(**env))
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert "--password-file" in r.stderr and "EDGEFLEET_BROKER_PASSWORD" in r.stderr
        assert PASSWORD not in r.stderr
    assert main(["devices", "--broker", url.replace("fleet@", ""), "--password-file", str(tmp_path / "none")]) == 2
    assert "cannot be read" in capsys.readouterr().err
    os.environ.pop("EDGEFLEET_BROKER_PASSWORD", None)
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    assert main(["devices", "--broker", url.replace("fleet@", ""), "--password-file", str(tmp_path / "pw")]) == 2
    assert "needs a user name" in capsys.readouterr().err

    # The password from the environment; the rollout runs, and the store keeps only the bare URL.
    data = tmp_path / "data"
    art = make_artifact(tmp_path / "v2", "2")
    with Simulator(_devices_url(broker), count=2, prefix="pw", group="pw", step_delay=0.01) as sim:
        r = run_cli("deploy", str(art), "--broker", url, *_tls(pki), "--group", "pw", "--json",
                    "--data-dir", str(data), *FAST, env=_env(EDGEFLEET_BROKER_PASSWORD=PASSWORD))
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["state"] == "SUCCEEDED" and set(sim.versions().values()) == {"2"}
    store = open_store(f"sqlite:///{data / 'fleet.db'}")
    try:
        assert store.rollout(json.loads(r.stdout)["rollout_id"]).broker == url
    finally:
        store.close()
    with sqlite3.connect(data / "fleet.db") as db:
        dump = "\n".join(db.iterdump())
    assert PASSWORD not in dump
    assert not [p for p in data.rglob("*") if p.is_file() and PASSWORD.encode() in p.read_bytes()]


def test_a_rollout_keeps_the_broker_url_without_its_password(tmp_path):
    """Whoever builds the rollout (the CLI, a controller holding a BrokerAccess, an old caller with
    a password in its URL), the row says where the broker is and never how to log in."""
    from edgefleet.messages import RolloutState
    from fleet.store import Rollout, open_store

    store = open_store(f"sqlite:///{tmp_path / 'fleet.db'}")
    try:
        for rid, broker in (("r1", BrokerAccess("mqtts://ops@b:8883", password=PASSWORD)),
                            ("r2", f"mqtts://ops:{PASSWORD}@b:8883,mqtt://:{PASSWORD}@c:1883")):
            store.save(Rollout(rid, "deploy", 0.0, 0.0, RolloutState.IN_PROGRESS, {}, 0, 1, broker=broker))  # type: ignore[arg-type]
        assert store.rollout("r1").broker == "mqtts://ops@b:8883"
        assert store.rollout("r2").broker == "mqtts://ops@b:8883,mqtt://c:1883"
    finally:
        store.close()
    assert PASSWORD.encode() not in (tmp_path / "fleet.db").read_bytes()


def test_a_resumed_rollout_takes_the_password_from_the_file_or_environment_again(tmp_path, monkeypatch):
    from fleet.cli import _broker

    args = argparse.Namespace(broker=None, password_file=None, ca_file=None, cert=None, key=None)
    monkeypatch.delenv("EDGEFLEET_BROKER", raising=False)
    monkeypatch.setenv("EDGEFLEET_BROKER_PASSWORD", "from-env")
    access = _broker(args, "mqtts://ops@b:8883")
    assert (access.url, access.password) == ("mqtts://ops@b:8883", "from-env")
    stale = _broker(args, "mqtts://ops:old-secret@b:8883")  # a row written before passwords were refused
    assert (stale.url, stale.password) == ("mqtts://ops@b:8883", "from-env")
    (tmp_path / "pw").write_text("from-file\n")
    args.password_file = str(tmp_path / "pw")
    assert _broker(args, "mqtts://ops@b:8883").password == "from-file"
    assert "from-file" not in repr(_broker(args, "mqtts://ops@b:8883"))


def test_encrypted_signing_key_needs_its_passphrase(fleet_broker, tmp_path, monkeypatch):
    (tmp_path / "pass").write_text("correct horse\n")
    (tmp_path / "wrong").write_text("battery staple\n")
    r = run_cli("keygen", "--out", str(tmp_path / "k"), "--passphrase-file", str(tmp_path / "pass"))
    assert r.returncode == 0, r.stderr
    key, pub = tmp_path / "k" / "signing.key", tmp_path / "k" / "signing.pub"
    assert key.read_text().startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----")
    art = make_artifact(tmp_path / "v2", "2")
    data = str(tmp_path / "data")
    with Simulator(fleet_broker.url, count=2, prefix="enc", group="enc", step_delay=0.01, signed_updates=True,
                   trusted_keys=[pub]) as sim:
        deploy = ["deploy", str(art), "--broker", fleet_broker.url, "--group", "enc", "--sign-key", str(key),
                  "--data-dir", data, "--json", *FAST]
        r = run_cli(*deploy)  # stdin is not a terminal: no prompt to hang on
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--sign-key-passphrase-file" in r.stderr, r.stderr
        r = run_cli(*deploy, "--sign-key-passphrase-file", str(tmp_path / "wrong"))
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "wrong passphrase" in r.stderr, r.stderr
        assert sim.commands_received == 0
        r = run_cli(*deploy, "--sign-key-passphrase-file", str(tmp_path / "pass"))
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["state"] == "SUCCEEDED" and set(sim.versions().values()) == {"2"}

    # On a terminal the tool asks, once.
    import getpass

    from fleet import cli

    asked = []
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(getpass, "getpass", lambda prompt: asked.append(prompt) or "correct horse")
    args = argparse.Namespace(sign_key=str(key), sign_key_passphrase_file=None, command="deploy")
    assert cli._sign_key(args) is not None and len(asked) == 1


def _sim(broker: MosquittoBroker, prefix: str, n: int = 3, **kw) -> Simulator:
    return Simulator(broker.url, count=n, prefix=prefix, group=prefix, step_delay=0.01, **kw)


def _first_line(proc: subprocess.Popen[str]) -> str:
    """The daemon's ready line (pytest's timeout bounds the wait)."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"no ready line (exit {proc.poll()})"
    return line


def _daemon(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "fleet.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=_env())


def test_every_command_honours_json(fleet_broker, tmp_path):
    from fleet.cli import build_parser

    b = ["--broker", fleet_broker.url]
    data = ["--data-dir", str(tmp_path / "data")]
    state = f"sqlite:///{tmp_path / 'data' / 'fleet.db'}"
    art = make_artifact(tmp_path / "v2", "2")
    (tmp_path / "token").write_text("t" * 32 + "\n")
    seen: set[str] = set()

    def check(*args: str, lines: bool = False) -> object:
        r = run_cli(*args, "--json", env=_env())
        assert r.returncode == 0, (args, r.stderr)
        seen.add(args[0])
        return [json.loads(x) for x in r.stdout.splitlines()] if lines else json.loads(r.stdout)

    with _sim(fleet_broker, "js", telemetry_interval=0.2):
        assert check("keygen", "--out", str(tmp_path / "k"))["encrypted"] is False
        assert {d["device_id"] for d in check("devices", *b)} >= {"js-00000", "js-00002"}
        rollout = check("deploy", str(art), *b, "--group", "js", *data, *FAST)["rollout_id"]
        assert check("status", *data)[0]["rollout_id"] == rollout
        assert check("status", rollout, *data)["state"] == "SUCCEEDED"
        assert check("status", rollout, "--device", "js-00000", *data)
        sent = check("rollback", *b, "--group", "js", *data)  # without --wait: the submitted rollout
        assert sent["kind"] == "rollback" and sent["sent"] == 3 and sent["rollout_id"]
        frames = check("watch", *b, "--group", "js", "--frames", "2", "--interval", "0.3", lines=True)
        assert len(frames) == 2 and frames[-1]["fleet"]["devices"] == 3
        assert {d["device_id"] for d in frames[-1]["devices"]} == {"js-00000", "js-00001", "js-00002"}
        assert check("export", *b, "--out", str(tmp_path / "t.jsonl"), "--duration", "0.5")["records"] > 0
        assert check("migrate", "--state", state)["schema_version"] >= 1
        for name, args in (("exporter", [*b, "--listen", "127.0.0.1:0"]),
                           ("serve", [*b, "--state", state, "--token-file", str(tmp_path / "token"),
                                      "--listen", "127.0.0.1:0", "--metrics", "off", "--serve", "127.0.0.1:0"])):
            proc = _daemon(name, *args, "--json")
            try:
                ready = json.loads(_first_line(proc))
                assert ready["ready"] == ("controller" if name == "serve" else "exporter"), ready
                seen.add(name)
                if name == "serve":  # the same commands through the controller
                    ctl = ["--controller", ready["api"], "--token-file", str(tmp_path / "token")]
                    submitted = check("rollback", *ctl, "--group", "js", "--force")  # the first one is still open
                    assert submitted["rollout_id"] and submitted["controller"] == ready["api"]
                    assert check("status", submitted["rollout_id"], *ctl)["kind"] == "rollback"
                    assert check("watch", *ctl, "--frames", "1", lines=True)[0]["fleet"]["devices"] >= 3
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)  # systemd allows 90 s; a loaded host (two test workers) took over 20
    sim = subprocess.Popen([sys.executable, "-m", "fleet.cli", "simulate", *b, "--count", "2", "--json"],
                           stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert json.loads(sim.stdout.readline())["ready"] is True
    finally:
        sim.send_signal(signal.SIGTERM)
        sim.wait(20)
    seen.add("simulate")
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert seen == set(sub.choices), f"commands without a --json check: {set(sub.choices) - seen}"


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_watch_on_a_terminal_is_a_live_table_cut_to_its_width_that_keeps_the_scrollback(fleet_broker):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 20, 60, 0, 0))  # 20 rows, 60 columns
    env = {k: v for k, v in _env(TERM="xterm-256color").items() if k not in ("COLUMNS", "LINES", "NO_COLOR")}
    with _sim(fleet_broker, "a-device-with-a-rather-long-name", n=30, telemetry_interval=0.2):
        proc = subprocess.Popen([sys.executable, "-m", "fleet.cli", "watch", "--broker", fleet_broker.url,
                                 "--frames", "3", "--interval", "0.3"], cwd=REPO, stdin=subprocess.DEVNULL,
                                stdout=slave, stderr=subprocess.PIPE, env=env)
        os.close(slave)
        out = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""
        os.close(master)
    text = out.decode("utf-8", "replace")
    assert "\x1b[2J" not in text and "\x1b[3J" not in text, "the screen or the scrollback was cleared"
    assert "\x1b[?1049h" not in text, "switched to the alternate screen"
    visible = [line for line in re.split(r"[\r\n]+", _ANSI.sub("", text)) if line.strip()]
    assert visible and max(len(line) for line in visible) <= 60, max(visible, key=len)
    assert any("…" in line for line in visible), "a too-wide cell is cut, not wrapped"
    assert any("more devices" in line for line in visible), "30 devices do not fit in 20 rows"
    assert any(line.startswith("fleet: ") for line in visible)


def test_commands_other_than_a_terminal_watch_need_no_rich(fleet_broker):
    """rich is in the fleet extra for watch's live table; nothing else may import it."""
    blocker = ("import runpy, sys; sys.modules['rich'] = None; sys.argv = ['edge-fleet', *sys.argv[1:]]; "
               "runpy.run_module('fleet.cli', run_name='__main__')")
    with _sim(fleet_broker, "norich", n=1, telemetry_interval=0.2):
        for args in (["devices", "--json"], ["watch", "--frames", "1"], ["watch", "--frames", "1", "--json"]):
            r = subprocess.run([sys.executable, "-c", blocker, *args, "--broker", fleet_broker.url], check=False,
                               cwd=REPO, capture_output=True, text=True, timeout=60, env=_env())
            assert r.returncode == 0 and "norich-00000" in r.stdout, (args, r.stderr)
