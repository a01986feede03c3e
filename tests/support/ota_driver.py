"""A minimal agent process for the OTA crash tests: OtaManager + ModelHost, no MQTT.

    python -m tests.support.ota_driver --state DIR --initial ARTIFACT_DIR --events EVENTS.jsonl
        [--key PUB.pem] [--update CMD.json] [--rollback] --out STATUS.json

Boots (journal recovery), installs the initial model if none is committed, runs live inference
traffic in a thread, applies the update and/or rollback command, waits until nothing is in
flight and writes a status JSON. Events are appended to a JSON-lines file and fsynced, the way
the service's outbox would keep them. With ``EDGEFLEET_CRASH_AT=<point>`` it dies at that point.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

from agent.host import ModelHost
from agent.ota import OtaManager
from edgefleet.manifest import sha256_file
from edgefleet.profiles import load_profile
from edgefleet.signing import load_public_key


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--state", required=True)
    ap.add_argument("--initial", required=True)
    ap.add_argument("--events", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--key")
    ap.add_argument("--update")
    ap.add_argument("--rollback", action="store_true")
    ap.add_argument("--profile", default="x86-dev")
    args = ap.parse_args(argv)

    events = open(args.events, "a", encoding="utf-8")  # noqa: SIM115 (open for the whole run)
    lock = threading.Lock()

    def emit(event: dict) -> None:
        with lock:
            events.write(json.dumps(event) + "\n")
            events.flush()
            os.fsync(events.fileno())

    profile = load_profile(args.profile)
    host = ModelHost(profile, autotune=False)
    keys = [load_public_key(args.key)] if args.key else []
    ota = OtaManager(Path(args.state), profile, keys, host, emit, reserve_free_mb=0, backoff_s=0.05,
                     download_timeout_s=5)
    booted = ota.boot()
    ota.install_initial(args.initial)

    stop, failures, served = threading.Event(), [], [0]

    def traffic() -> None:
        rng = np.random.default_rng(3)
        while not stop.is_set():
            try:
                host.infer(rng.integers(-128, 128, (1, 32, 32, 3)).astype(np.int8))
                served[0] += 1
            except Exception as exc:  # noqa: BLE001 (reported in the status)
                failures.append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.002)

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    ota.wait_idle(60)
    if args.update:
        ota.handle_update(json.loads(Path(args.update).read_text()))
        ota.wait_idle(60)
    if args.rollback:
        ota.handle_rollback({"id": "rollback-1", "to": None})
        ota.wait_idle(60)
    deadline = time.monotonic() + 10
    while served[0] < 20 and time.monotonic() < deadline:  # prove the recovered model serves
        time.sleep(0.01)
    stop.set()
    thread.join()
    status = ota.status()
    active = status["active"]
    model_file = ota.store.model_path(active["slot"]) if active else None
    status.update(booted=booted, failures=failures, served=served[0],
                  active_file_sha256=sha256_file(model_file) if model_file else None,
                  slots=sorted(p.name for p in ota.store.slots.iterdir()),
                  staging=sorted(p.name for p in ota.store.staging.iterdir()))
    Path(args.out).write_text(json.dumps(status, indent=2))
    ota.close()
    host.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
