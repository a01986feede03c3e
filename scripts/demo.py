"""`make demo`: the whole mission in about two minutes, with the real programs.

Trains a real model (scikit-learn's digits), converts it, starts a private Mosquitto and three
real agents (separate processes, each with its own state dir), rolls out v2 with a canary, sends
a broken v3 that the canary rolls back on its own, and rolls one device back by hand. Every step
runs the same command a user would type; the commands are printed before they run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from edgefleet.testing.broker import MosquittoBroker, free_port

REPO = Path(__file__).resolve().parents[1]

BIN = Path(sys.executable).parent
DEVICES = ["demo-pi-1", "demo-pi-2", "demo-pi-3"]
STARTED = time.monotonic()


def heading(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m  (t+{time.monotonic() - STARTED:.0f}s)", flush=True)


def run(cmd: list[str], *, expect: int | None = 0, quiet: bool = False, env: dict | None = None) -> int:
    """Run a user-facing command, showing it first (with the venv's bin dir shortened away)."""
    shown = " ".join(shlex.quote(str(c)).replace(str(BIN) + "/", "") for c in cmd)
    print(f"$ {shown}", flush=True)
    proc = subprocess.run([str(c) for c in cmd], check=False, cwd=REPO, text=True, capture_output=quiet,
                          env={**os.environ, **(env or {})})
    if expect is not None and proc.returncode != expect:
        if quiet:
            print(proc.stdout, proc.stderr)
        raise SystemExit(f"demo: expected exit {expect} from {cmd[0]}, got {proc.returncode}")
    return proc.returncode


def train_models(out: Path) -> None:
    """v1 and v2: the same CNN trained differently; v3: v2 with its classes scrambled (valid, wrong)."""
    from sample_models import train_digits_model, write_samples

    from converter._tf import keras

    model, x, y = train_digits_model(epochs=4, seed=0)
    n = int(len(x) * 0.8)
    model.save(out / "digits_v1.keras")
    write_samples(out / "calibration.npz", x[:n], y[:n])
    write_samples(out / "eval.npz", x[n:], y[n:])
    np.save(out / "stream.npy", x[n:])
    model_v2, _, _ = train_digits_model(epochs=8, seed=0)
    model_v2.save(out / "digits_v2.keras")
    broken = keras.models.clone_model(model_v2)
    broken.set_weights(model_v2.get_weights())
    kernel, bias = broken.layers[-1].get_weights()
    perm = np.roll(np.arange(kernel.shape[1]), 3)  # digit d is now reported as d+3
    broken.layers[-1].set_weights([kernel[:, perm], bias[perm]])
    broken.save(out / "digits_v3.keras")


def write_agent_config(root: Path, device: str, broker_url: str, http_port: int, model: Path, pub: Path) -> Path:
    state = root / device
    state.mkdir(parents=True, exist_ok=True)
    config = {
        "device_id": device,
        "group": "demo-store",
        "profile": "rpi4",
        "state_dir": str(state / "state"),
        "model": str(model),
        "broker": {"url": broker_url, "keepalive_s": 5},
        "trusted_keys": [str(pub)],
        "http": {"listen": f"127.0.0.1:{http_port}"},
        "source": {"type": "none"},
        "telemetry": {"interval_s": 2},
        "cache": {"enabled": True},
    }
    path = state / "agent.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is valid YAML
    return path


class Feeder(threading.Thread):
    """Plays the device's application: posts digits to each agent's local REST endpoint."""

    def __init__(self, ports: list[int], samples: np.ndarray, rate_hz: float = 15.0) -> None:
        super().__init__(daemon=True)
        self.ports, self.samples, self.period = ports, samples, 1.0 / rate_hz
        self.stop = threading.Event()
        self.ok = self.failed = 0

    def run(self) -> None:
        rng = np.random.default_rng(0)
        while not self.stop.is_set():
            for port in self.ports:
                x = self.samples[rng.integers(len(self.samples))]
                body = json.dumps({"instances": [x.tolist()]}).encode()
                req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models/digits:predict", data=body,
                                             headers={"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(req, timeout=2) as resp:
                        resp.read()
                    self.ok += 1
                except OSError:
                    self.failed += 1
            self.stop.wait(self.period)


def wait_online(broker_url: str, count: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = subprocess.run([str(BIN / "edge-fleet"), "devices", "--broker", broker_url, "--json"], check=False,
                              capture_output=True, text=True)
        if proc.returncode == 0:
            devices = json.loads(proc.stdout)
            rows = devices if isinstance(devices, list) else devices.get("devices", [])
            if sum(1 for d in rows if d.get("online")) >= count:
                return
        time.sleep(1)
    raise SystemExit(f"demo: {count} agents did not come online within {timeout:.0f}s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "demo-out"), help="where artifacts, logs and state go")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    (out / "models").mkdir(parents=True)
    (out / "artifacts").mkdir()
    convert, fleet, agent_bin = BIN / "edge-convert", BIN / "edge-fleet", BIN / "edge-agent"
    procs: list[subprocess.Popen] = []
    broker: MosquittoBroker | None = None
    feeder: Feeder | None = None
    try:
        heading("1. Train a real model (scikit-learn digits) and convert it for a Raspberry Pi 4")
        train_models(out / "models")
        run([fleet, "keygen", "--out", out / "keys"])
        common = ["--calibration", out / "models/calibration.npz", "--eval", out / "models/eval.npz",
                  "--sign-key", out / "keys/signing.key", "--name", "digits"]
        run([convert, out / "models/digits_v1.keras", "--profile", "rpi4", *common, "--artifact-version", "1",
             "--out", out / "artifacts/v1"])
        print("\n-- the same model for a Coral USB Accelerator (Edge TPU) --")
        run([convert, out / "models/digits_v1.keras", "--profile", "coral-usb", *common, "--artifact-version", "1",
             "--out", out / "artifacts/v1-coral", "--quiet"], expect=None)
        report = (out / "artifacts/v1-coral/report.md").read_text()
        print("\n".join(report.splitlines()[:40]))
        for version in ("2", "3"):
            run([convert, out / f"models/digits_v{version}.keras", "--profile", "rpi4", *common,
                 "--artifact-version", version, "--out", out / f"artifacts/v{version}", "--quiet"], expect=None)

        heading("2. Start a private Mosquitto and three agents (separate processes, own state dirs)")
        broker = MosquittoBroker(out / "broker").start()
        print(f"broker: {broker.url}")
        ports = [free_port() for _ in DEVICES]
        for device, port in zip(DEVICES, ports):
            cfg = write_agent_config(out / "agents", device, broker.url, port, out / "artifacts/v1",
                                     out / "keys/signing.pub")
            with open(out / "agents" / device / "agent.log", "w") as log:  # the child keeps its own copy
                procs.append(subprocess.Popen([str(agent_bin), "run", "--config", str(cfg)], stdout=log,
                                              stderr=subprocess.STDOUT, cwd=REPO))
            print(f"$ edge-agent run --config {cfg.relative_to(out)}    (HTTP on 127.0.0.1:{port})")
        wait_online(broker.url, len(DEVICES))
        feeder = Feeder(ports, np.load(out / "models/stream.npy"))
        feeder.start()

        heading("3. The fleet, live")
        run([fleet, "devices", "--broker", broker.url, "--listen", "3"])  # 3 s: catch a telemetry round
        run([fleet, "watch", "--broker", broker.url, "--frames", "2", "--interval", "2"])

        data_dir = ["--data-dir", out / "fleet-data", "--serve", "127.0.0.1:0"]  # artifacts on loopback
        heading("4. Deploy v2: one canary, then the rest")
        run([fleet, "deploy", out / "artifacts/v2", "--broker", broker.url, "--all", "--canary", "1",
             "--device-timeout", "60", "--wait", *data_dir])

        heading("5. Deploy a broken v3 (answers with scrambled classes): the canary rolls back by itself")
        code = run([fleet, "deploy", out / "artifacts/v3", "--broker", broker.url, "--all", "--canary", "1",
                    "--device-timeout", "60", "--wait", *data_dir], expect=None)
        print(f"(edge-fleet deploy exited {code}: the rollout aborted and no other device received v3)")
        if code == 0:
            raise SystemExit("demo: the broken v3 rollout should have aborted")

        heading("6. An operator rolls one device back from v2 to v1")
        run([fleet, "rollback", "--broker", broker.url, "--device", DEVICES[0], "--to", "1", "--wait",
             "--sign-key", out / "keys/signing.key"])  # below the floor (2): the fleet key signs it
        time.sleep(1)
        run([fleet, "devices", "--broker", broker.url])
        print(f"local REST requests during the demo: {feeder.ok} answered, {feeder.failed} failed")
    finally:
        heading("7. Stop everything")
        if feeder:
            feeder.stop.set()
            feeder.join(5)
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if broker:
            broker.stop()
    print(f"artifacts: {out / 'artifacts'}  (report.md, manifest.json, model.tflite per version)")
    print(f"agent logs and state: {out / 'agents'}")
    print(f"fleet rollouts (SQLite): {out / 'fleet-data'}")
    print(f"demo finished in {time.monotonic() - STARTED:.0f} s; no process left running")
    return 0


if __name__ == "__main__":
    sys.exit(main())
