"""End-to-end checks INSIDE the emulated arm64 root, after the runtime tests (scripts/arm64_inside.sh).

1. ``edge-agent run`` against a mosquitto started inside the root on a free port: the agent must
   publish its retained ``state`` (online, serving the artifact) and telemetry, and its retained
   offline state on SIGTERM.
2. ``edge-agent validate`` of every artifact converted on the x86 host (one per aarch64 profile):
   the golden samples computed on x86 must pass on ARM within the manifest's own ``atol``; the
   measured ARM-vs-x86 difference is printed in output quantization steps.
3. A native crash of the validation child (a real SIGSEGV under qemu) must be reported as a
   signal, not as a bad file.

Latency is not judged here: under emulation it means nothing, so the profiles used are the
shipped ones with ``limits.latency_budget_ms`` raised, and no timing is printed. Profiles that
require an Edge TPU are checked on the CPU path of the same artifact (no TPU is emulated).
Uses only what the wheel installed (paho, numpy, the runtime) and mosquitto from the root.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

STAGE = Path("/opt/edgefleet-test")
ARTIFACTS = STAGE / "artifacts"
PROFILES = STAGE / "device_profiles"
BIN = Path(sys.executable).parent
EMULATION_BUDGET_MS = 600_000.0
FAILURES: list[str] = []


def say(msg: str) -> None:
    print(f"arm64: {msg}", flush=True)


def fail(msg: str) -> None:
    FAILURES.append(msg)
    print(f"arm64: FAIL: {msg}", flush=True)


def emulation_profile(name: str, out: Path) -> Path:
    """The shipped profile with the latency budget lifted (and the CPU path when a TPU is required)."""
    data = yaml.safe_load((PROFILES / f"{name}.yaml").read_text())
    data["limits"]["latency_budget_ms"] = EMULATION_BUDGET_MS
    if data["runtime"].get("accelerator_required"):
        data["runtime"]["accelerator_required"] = False
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


class Retained:
    """A tiny paho client collecting the messages of some topics."""

    def __init__(self, port: int, topics: list[str]) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.messages: list[tuple[str, dict[str, Any], bool]] = []
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"arm64-check-{os.getpid()}")
        self.client.on_message = lambda c, u, m: self.messages.append(
            (m.topic, json.loads(m.payload or b"null"), bool(m.retain)))
        self.client.connect("127.0.0.1", port, keepalive=10)
        for topic in topics:
            self.client.subscribe(topic, qos=1)
        self.client.loop_start()

    def wait(self, pred: Any, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for msg in list(self.messages):
                if pred(msg):
                    return msg
            time.sleep(0.1)
        return None

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def check_agent_run(work: Path, profile: Path, artifact: Path) -> None:
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = work / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    "log_dest stderr\nuser root\n")
    broker = subprocess.Popen([mosquitto, "-c", str(conf)], stdout=subprocess.DEVNULL,
                              stderr=open(work / "mosquitto.log", "wb"))  # noqa: SIM115
    agent = None
    watcher = None
    try:
        if not wait_port(port, 30):
            fail(f"mosquitto inside the root did not listen on {port}")
            return
        device = "arm64-smoke"
        cfg = {"device_id": device, "group": "arm64", "profile": str(profile), "state_dir": str(work / "state"),
               "model": str(artifact), "broker": {"url": f"mqtt://127.0.0.1:{port}", "keepalive_s": 5},
               "http": {"listen": None}, "telemetry": {"interval_s": 1.0}, "cache": {"enabled": False}}
        (work / "agent.yaml").write_text(yaml.safe_dump(cfg))
        state_topic = f"edgefleet/v1/devices/{device}/state"
        telemetry_topic = f"edgefleet/v1/devices/{device}/telemetry"
        log = open(work / "agent.log", "wb")  # noqa: SIM115
        agent = subprocess.Popen([str(BIN / "edge-agent"), "run", "--config", str(work / "agent.yaml")],
                                 stdout=log, stderr=log, cwd=work, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        watcher = Retained(port, [state_topic, telemetry_topic])
        online = watcher.wait(lambda m: m[0] == state_topic and (m[1] or {}).get("online"), 180)
        if online is None:
            tail = (work / "agent.log").read_text(errors="replace").strip().splitlines()[-5:]
            fail(f"edge-agent run published no online state within 180 s; agent.log: {' | '.join(tail)}")
            return
        state = online[1]
        model = state.get("model") or {}
        if model.get("name") != "digits":
            fail(f"edge-agent run is online but does not serve the artifact: state.model = {model}")
        watcher.close()
        # A fresh subscriber gets the RETAINED state: what the fleet sees of a device it never talked to.
        late = Retained(port, [state_topic, telemetry_topic])
        retained = late.wait(lambda m: m[0] == state_topic and m[2] and (m[1] or {}).get("online"), 30)
        telemetry = late.wait(lambda m: m[0] == telemetry_topic, 60)
        if retained is None:
            fail("a new subscriber did not get the agent's retained online state")
        else:
            say(f"edge-agent run: retained state online, profile {retained[1].get('profile')}, "
                f"model {model.get('name')} v{model.get('version')}, accelerator {retained[1].get('accelerator')}")
        if telemetry is None:
            fail("edge-agent run published no telemetry within 60 s")
        else:
            t = telemetry[1]
            say("edge-agent run: telemetry keys " + ", ".join(sorted(t)) +
                f"; temp_c {t.get('temp_c')!r} (qemu-user emulates the CPU only: /sys is the host's)")
        agent.send_signal(signal.SIGTERM)
        try:
            rc = agent.wait(60)
        except subprocess.TimeoutExpired:
            rc = None
        if rc != 0:
            fail(f"edge-agent run did not exit 0 on SIGTERM (exit {rc})")
        offline = late.wait(lambda m: m[0] == state_topic and (m[1] or {}).get("online") is False, 30)
        if offline is None:
            fail("edge-agent run did not publish its offline state on SIGTERM")
        else:
            say("edge-agent run: stopped on SIGTERM, offline state published")
        late.close()
    finally:
        for proc in (agent, broker):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def qemu_cpu(name: str) -> str:
    """The QEMU CPU model of the profile's core ("4x Cortex-A53" -> cortex-a53), else the root's default."""
    cpu = str(yaml.safe_load((PROFILES / f"{name}.yaml").read_text())["hardware"].get("cpu", ""))
    match = re.search(r"Cortex-A(\d+)", cpu)
    if match and match.group(1) in ("53", "55", "57", "72", "76"):
        return f"cortex-a{match.group(1)}"
    return os.environ.get("QEMU_CPU", "cortex-a72")


def output_step(model_file: Path) -> float:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        from tflite_runtime.interpreter import Interpreter  # type: ignore[no-redef]
    interp = Interpreter(model_path=str(model_file))
    return max((float(d["quantization"][0]) for d in interp.get_output_details()), default=0.0)


def validate(artifact: Path, profile: Path | str, env: dict[str, str] | None = None) -> tuple[int, dict, str]:
    proc = subprocess.run([str(BIN / "edge-agent"), "validate", "--model", str(artifact), "--profile",
                           str(profile), "--json"], capture_output=True, text=True, check=False,
                          env={**os.environ, **(env or {})}, timeout=600)
    line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("{")), "{}")
    return proc.returncode, json.loads(line), proc.stderr.strip()


def check_validate(work: Path) -> None:
    names = sorted(p.name for p in ARTIFACTS.iterdir() if (p / "manifest.json").is_file())
    if not names:
        fail(f"no artifacts in {ARTIFACTS}")
        return
    for name in names:
        art = ARTIFACTS / name
        manifest = json.loads((art / "manifest.json").read_text())
        atol = manifest["golden"]["atol"]
        cpu = qemu_cpu(name)
        rc, report, err = validate(art, emulation_profile(name, work / "profiles"), {"QEMU_CPU": cpu})
        golden = report.get("golden") or {}
        if rc != 0 or not report.get("ok"):
            fail(f"validate {name} (emulated {cpu}): {report.get('reason') or err or f'exit {rc}'}"
                 f" (golden max |ARM - x86| {golden.get('max_abs_diff')}, atol {atol})")
            continue
        diff = float(golden.get("max_abs_diff", 0.0))
        step = output_step(art / "model.tflite")
        steps = f"{diff / step:.2f} output steps" if step else "float outputs"
        say(f"validate {name} (emulated {cpu}): ok, golden {golden.get('passed')}/{golden.get('samples')} passed; "
            f"max |ARM - x86| {diff:.6g} ({steps}), atol {atol}; runtime {report.get('details', {}).get('runtime')}, "
            f"accelerator {report.get('details', {}).get('accelerator')}")
    for name in names:
        data = yaml.safe_load((PROFILES / f"{name}.yaml").read_text())
        if data["runtime"].get("accelerator_required"):
            rc, report, err = validate(ARTIFACTS / name, PROFILES / f"{name}.yaml")
            reason = report.get("reason") or err
            note = "refused as expected" if rc != 0 else "UNEXPECTEDLY accepted"
            say(f"validate {name} with its shipped profile (Edge TPU required, none here): {note}: {reason}")
            if rc == 0:
                fail(f"validate {name}: ran without the Edge TPU its profile requires")


def note_qemu_max(work: Path, name: str) -> None:
    """Informational: the same artifact on QEMU's "max" CPU (SVE2 + SME, which no Pi has)."""
    rc, report, err = validate(ARTIFACTS / name, emulation_profile(name, work / "profiles"), {"QEMU_CPU": "max"})
    result = "ok" if rc == 0 else (report.get("reason") or err)
    say(f"note: validate {name} on QEMU's 'max' CPU (SVE2/SME, not a Pi core; not judged): {result}")


CRASH_HOOK = '''\
import os, sys
if os.environ.get("EDGEFLEET_ARM64_CRASH") and "agent.validation.child" in getattr(sys, "orig_argv", []):
    import ctypes
    ctypes.string_at(0)  # a real native SIGSEGV, as a runtime bug would raise
'''


def check_crash_report(work: Path, name: str) -> None:
    hook = work / "crashhook"
    hook.mkdir(parents=True, exist_ok=True)
    (hook / "sitecustomize.py").write_text(CRASH_HOOK)
    env = {"EDGEFLEET_ARM64_CRASH": "1", "PYTHONPATH": str(hook)}
    rc, report, err = validate(ARTIFACTS / name, emulation_profile(name, work / "profiles"), env)
    reason = report.get("reason") or err
    if rc == 0 or "SIGSEGV" not in reason:
        fail(f"a SIGSEGV in the validation child was not reported as one: exit {rc}: {reason}")
        return
    blames_file = "corrupt" in reason or "not a TFLite model" in reason
    say(f"validate with a native crash in the child: {reason!r}" +
        (" -- NOTE: still blames the file, not the runtime on this platform" if blames_file else ""))


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="arm64-checks-"))
    names = sorted(p.name for p in ARTIFACTS.iterdir() if (p / "manifest.json").is_file())
    serving = "rpi4" if "rpi4" in names else (names[0] if names else None)
    if serving is None:
        fail(f"no artifacts in {ARTIFACTS}")
    else:
        check_agent_run(work / "run", emulation_profile(serving, work / "profiles"), ARTIFACTS / serving)
        check_validate(work)
        check_crash_report(work, serving)
        note_qemu_max(work, serving)
    if FAILURES:
        say(f"{len(FAILURES)} end-to-end check(s) failed")
        return 1
    say("end-to-end checks passed")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
