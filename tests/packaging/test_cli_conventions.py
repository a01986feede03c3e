"""What the three programs promise alike: --version, exit codes in --help, logs fit for journald."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgefleet import __version__
from edgefleet.cli import configure_logging, run_main, under_journald
from edgefleet.errors import ConfigError, ExitCode, TransportError

REPO = Path(__file__).resolve().parents[2]
PROGRAMS = {"edge-agent": "agent.cli", "edge-convert": "converter.cli", "edge-fleet": "fleet.cli"}
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def _cli(module: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, check=False, **kwargs)


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_version_alone_prints_the_package_version_and_exits_0(program: str) -> None:
    proc = _cli(PROGRAMS[program], "--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{program} {__version__}"


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_help_lists_the_exit_codes_with_the_programs_own(program: str) -> None:
    import importlib

    text = importlib.import_module(PROGRAMS[program]).build_parser().format_help()
    codes = dict(re.findall(r"^\s+(\d+)  (.+)$", text.partition("exit codes:")[2], re.MULTILINE))
    assert {"0", "2", "4", "70", "130"} <= set(codes), text
    assert "could not reach" in codes["4"] and "bad arguments" in codes["2"]
    own = {"edge-agent": ("1", "validate"), "edge-fleet": ("1", "rollout"), "edge-convert": ("3", "NOT deployable")}
    code, words = own[program]
    assert words in codes[code], codes
    assert "--log-level" in text and "--version" in text


def test_edge_convert_version_with_a_value_is_refused_naming_the_new_option(capsys) -> None:
    from converter.cli import main

    assert main(["m.keras", "--profile", "rpi4", "--version", "3"]) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--artifact-version" in err, err


def test_artifact_version_and_its_model_version_alias_set_the_artifacts_version() -> None:
    from converter.cli import build_parser

    for flag in ("--artifact-version", "--model-version"):
        assert build_parser().parse_args(["m.keras", flag, "2.1"]).artifact_version == "2.1"
    assert build_parser().parse_args(["m.keras"]).artifact_version == "1"


@pytest.mark.parametrize(("raised", "code"), [
    (ConfigError("bad flag"), 2), (TransportError("cannot reach MQTT broker"), 4),
    (RuntimeError("a bug"), 70), (KeyboardInterrupt(), 130),
])
def test_each_kind_of_failure_has_its_own_exit_code_and_one_line(raised: BaseException, code: int, capsys) -> None:
    def main(argv: list[str]) -> int:
        raise raised

    assert run_main(main, []) == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err


def test_an_unreachable_broker_exits_4_not_2_so_systemd_restarts_and_scripts_can_retry() -> None:
    from edgefleet.testing.broker import free_port

    url = f"mqtt://127.0.0.1:{free_port()}"
    proc = _cli("fleet.cli", "devices", "--broker", url)
    assert proc.returncode == ExitCode.TRANSPORT, proc.stderr
    assert proc.stderr.startswith(f"error: cannot reach MQTT broker {url}") and proc.stderr.count("\n") == 1
    assert _cli("fleet.cli", "devices", "--broker", "http://x").returncode == ExitCode.USAGE


# -- logs under journald ---------------------------------------------------------------------------

def _journal_env(stream, **extra: str) -> dict[str, str]:
    st = os.fstat(stream.fileno())
    return {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}", **extra}


def _agent_config(tmp_path: Path) -> Path:
    """A config that starts (the broker is unreachable, the agent retries) and logs a warning at once."""
    password = tmp_path / "mqtt.pass"
    password.write_text("secret\n")
    password.chmod(0o644)  # readable by others: the agent warns
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"device_id: pi-log\nprofile: x86-dev\nstate_dir: {tmp_path / 'state'}\n"
                   f"broker: {{url: 'mqtt://127.0.0.1:1', username: pi-log, password_file: {password}}}\n"
                   "http: {listen: null}\nsource: {type: none}\n")
    return cfg


def _agent_log(tmp_path: Path, journal: bool, *args: str, until: str = "readable by other users") -> list[str]:
    """stderr lines of ``edge-agent run`` (stopped with SIGTERM once ``until`` was logged)."""
    log = tmp_path / f"stderr-{journal}.txt"
    with log.open("w+") as err:
        env = _journal_env(err) if journal else {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
        env["NOTIFY_SOCKET"] = str(tmp_path / "no-such.sock")  # sd_notify fails: a debug line
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(_agent_config(tmp_path)),
                                 *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, env=env)
        try:
            deadline = time.monotonic() + 30
            while until not in log.read_text() and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.1)
            time.sleep(0.5)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    return log.read_text().splitlines()


def test_under_journald_each_line_has_its_syslog_priority_and_no_timestamp(tmp_path: Path) -> None:
    lines = _agent_log(tmp_path, True, "--log-level", "debug")
    warning = [line for line in lines if "readable by other users" in line]
    assert warning and warning[0].startswith("<4>WARNING agent.service.statefiles: "), lines
    assert any(line.startswith("<7>DEBUG ") for line in lines), lines
    assert all(re.match(r"<[2-7]>", line) for line in lines), lines
    assert not any(TIMESTAMP.search(line[3:]) for line in lines), "journald stamps lines itself"


def test_under_journald_the_default_level_is_info_and_the_error_line_has_error_priority(tmp_path: Path) -> None:
    lines = _agent_log(tmp_path, True)
    assert any(line.startswith("<4>WARNING ") for line in lines), lines
    assert not any(line.startswith("<7>") for line in lines), "debug stays out unless asked"
    bad = tmp_path / "bad.yaml"
    bad.write_text("device_id: pi-1\nprofile: rpi4\nstate_dir: s\nbroker: {url: 'mqtt://127.0.0.1:1'}\n"
                   "telemetry: {intervall_s: 5}\n")
    with (tmp_path / "err.txt").open("w+") as err:
        proc = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", str(bad)], cwd=REPO,
                              stderr=err, env=_journal_env(err), timeout=60, check=False)
        err.seek(0)
        text = err.read()
    assert proc.returncode == 2 and text == f"<3>error: {bad}: telemetry.intervall_s: unknown key\n", text


def test_on_a_terminal_or_a_file_lines_keep_their_timestamp_and_no_prefix(tmp_path: Path) -> None:
    lines = _agent_log(tmp_path, False)
    warning = [line for line in lines if "readable by other users" in line]
    assert warning and TIMESTAMP.match(warning[0]) and " WARNING agent.service.statefiles: " in warning[0], lines
    assert not any(line.startswith("<") for line in lines)


def test_a_journal_stream_inherited_by_a_redirected_child_is_not_taken_for_the_journal(tmp_path: Path) -> None:
    with (tmp_path / "a").open("w") as journal, (tmp_path / "b").open("w") as redirected:
        env = _journal_env(journal)
        assert under_journald(journal, env)
        assert not under_journald(redirected, env)
        assert not under_journald(journal, {})


def test_a_multi_line_record_keeps_its_priority_on_every_line(tmp_path: Path) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    with (tmp_path / "j").open("w+") as stream:
        os.environ["JOURNAL_STREAM"] = _journal_env(stream)["JOURNAL_STREAM"]
        try:
            root.handlers = []
            configure_logging(stream=stream)
            try:
                raise ValueError("boom")
            except ValueError:
                logging.getLogger("edgefleet.test").exception("failed")
            stream.flush()
            stream.seek(0)
            lines = stream.read().splitlines()
        finally:
            del os.environ["JOURNAL_STREAM"]
            for handler in root.handlers:
                root.removeHandler(handler)
            root.handlers, root.level = saved[0], saved[1]
    assert lines[0] == "<3>ERROR edgefleet.test: failed"
    assert len(lines) > 3 and all(line.startswith("<3>") for line in lines), lines
