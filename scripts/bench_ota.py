"""OTA benchmark: activation time of a ~4 MB model, failed requests during hot swaps, rollback speed.

Prints a markdown section, writes the figures as JSON to ``--out`` and a timeline of one update
(states and live request latencies) to ``--plot``. Everything is real: a loopback HTTP server,
the child-process validator, ModelHost/Engine with the installed runtime, paced live traffic.

    python scripts/bench_ota.py --out bench/ota.json --plot bench/ota.png
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OTA_MODELS = REPO / "tests" / "data" / "models" / "ota"

from agent.host import ModelHost
from agent.ota import OtaManager
from edgefleet.profiles import load_profile
from edgefleet.signing import Ed25519PrivateKey
from edgefleet.testing.artifacts import build_artifact
from edgefleet.testing.http_server import ArtifactServer


class PacedTraffic:
    """Requests at a fixed rate from one thread; records (t, latency, ok) of each."""

    def __init__(self, host: ModelHost, rate_hz: float) -> None:
        self.host, self.period = host, 1.0 / rate_hz
        self.records: list[tuple[float, float, bool]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rng = np.random.default_rng(0)
        xs = [rng.integers(-128, 128, (1, 32, 32, 3)).astype(np.int8) for _ in range(64)]
        nxt = time.monotonic()
        i = 0
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                self.host.infer(xs[i % 64])
                ok = True
            except Exception:  # noqa: BLE001 (counted)
                ok = False
            self.records.append((t0, time.monotonic() - t0, ok))
            i += 1
            nxt += self.period
            time.sleep(max(0.0, nxt - time.monotonic()))

    def __enter__(self) -> PacedTraffic:  # noqa: PYI034 (py310: no typing.Self)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def failed(self) -> int:
        return sum(1 for r in self.records if not r[2])


def make_big(path: Path) -> None:
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_ota_test_models.py"), "--big", str(path)],
                   check=True, capture_output=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})


def phases(timeline: list[tuple[float, str, str]], version: str) -> dict[str, float]:
    t = {state: ts for ts, v, state in timeline if v == version}
    out = {
        "download_s": t["verifying"] - t["downloading"],
        "verify_s": t["validating"] - t["verifying"],
        "validate_s": t["installing"] - t["validating"],
        "install_swap_s": t["probation"] - t["installing"],
    }
    out["activation_s"] = t["probation"] - t["queued"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="JSON figures")
    ap.add_argument("--plot", help="timeline PNG")
    ap.add_argument("--rate", type=float, default=200.0, help="live requests per second during updates")
    ap.add_argument("--runs", type=int, default=3, help="updates of the ~4 MB model to time")
    args = ap.parse_args()

    profile = load_profile("x86-dev")
    key = Ed25519PrivateKey.generate()
    results: dict = {"rate_hz": args.rate}
    with tempfile.TemporaryDirectory(prefix="bench-ota-") as tmp, ArtifactServer() as http:
        base = Path(tmp)
        make_big(base / "big.tflite")
        v1 = build_artifact(OTA_MODELS / "clf_a.tflite", base / "v1", version="1", key=key)
        bigs = [build_artifact(base / "big.tflite", base / f"big{i}", version=str(i + 2), key=key,
                               probation={"inferences": 100, "seconds": 2, "min_agreement": 0}, golden_samples=4)
                for i in range(args.runs)]
        bad = build_artifact(OTA_MODELS / "clf_b.tflite", base / "bad", version=str(args.runs + 2), key=key,
                             probation={"inferences": 100, "seconds": 5})
        events: list[dict] = []
        host = ModelHost(profile, autotune=False)
        ota = OtaManager(base / "state", profile, [key.public_key()], host, events.append, reserve_free_mb=0)
        ota.boot()
        ota.install_initial(v1.dir)
        size = bigs[0].manifest.model.size
        results["model_bytes"] = size

        # 1) activation of a ~4 MB model, under paced live traffic
        runs = []
        plot_data = None
        for i, art in enumerate(bigs):
            url = http.add(f"/big{i}/model.tflite", art.model_path.read_bytes())
            with PacedTraffic(host, args.rate) as traffic:
                t_start = time.monotonic()
                ota.handle_update({"id": f"big{i}", **art.update_fields(url, f"big{i}")})
                ota.wait_idle(120)
                time.sleep(0.2)
            final = events[-1]
            ph = phases(ota.timeline, art.manifest.version)
            runs.append({**ph, "final": final["state"], "requests": len(traffic.records),
                         "failed_requests": traffic.failed()})
            if i == 0:
                plot_data = (t_start, [(ts, v, s) for ts, v, s in ota.timeline if v == art.manifest.version],
                             list(traffic.records))
        results["activation_runs"] = runs

        # 2) bare hot swaps under load (no OTA around them)
        with PacedTraffic(host, args.rate) as traffic:
            swap_times = []
            for i in range(10):
                src = (v1 if i % 2 == 0 else bigs[-1]).dir
                t0 = time.perf_counter()
                host.activate(src)
                swap_times.append(time.perf_counter() - t0)
                time.sleep(0.05)
        results["hot_swaps"] = {"swaps": len(swap_times), "requests": len(traffic.records),
                                "failed_requests": traffic.failed(),
                                "activate_median_ms": float(np.median(swap_times) * 1000)}

        # 2b) what ModelHost adds per call (generation counter under a lock) vs the bare engine
        host.activate(v1.dir)
        x = np.zeros((1, 32, 32, 3), np.int8)
        engine = host.engine
        for _ in range(500):
            host.infer(x)
        reps = 5000
        t0 = time.perf_counter()
        for _ in range(reps):
            engine.infer(x)
        bare = (time.perf_counter() - t0) / reps
        t0 = time.perf_counter()
        for _ in range(reps):
            host.infer(x)
        hosted = (time.perf_counter() - t0) / reps
        results["host_overhead_us"] = {"engine_us": bare * 1e6, "host_us": hosted * 1e6,
                                       "overhead_us": (hosted - bare) * 1e6}
        host.activate(ota.store.model_path(ota.status()["active"]["slot"]))

        # 3) failed probation -> previous model serving again
        url = http.add("/bad/model.tflite", bad.model_path.read_bytes())
        with PacedTraffic(host, args.rate) as traffic:
            ota.handle_update({"id": "bad", **bad.update_fields(url, "bad")})
            ota.wait_idle(60)
        final = events[-1]
        t = {state: ts for ts, v, state in ota.timeline if v == bad.manifest.version}
        results["failed_probation"] = {"final": final["state"], "reason": final.get("reason"),
                                       "probation_to_rolled_back_ms": (t["rolled_back"] - t["probation"]) * 1000,
                                       "revert_ms": (ota.last_revert_s or 0) * 1000,
                                       "requests": len(traffic.records), "failed_requests": traffic.failed()}
        ota.close()
        host.close()

    act = results["activation_runs"]
    med = {k: float(np.median([r[k] for r in act])) for k in ("download_s", "verify_s", "validate_s",
                                                               "install_swap_s", "activation_s")}
    results["activation_median"] = med
    fp = results["failed_probation"]
    hs = results["hot_swaps"]
    print(f"Model {results['model_bytes'] / 1e6:.1f} MB int8, {args.runs} updates over loopback HTTP with "
          f"{args.rate:.0f} live requests/s (x86-dev profile, validation in a child process).\n")
    print("| measure | value | target |")
    print("|---|---|---|")
    print(f"| activation (queued -> new model serving), median | {med['activation_s'] * 1000:.0f} ms | |")
    print(f"| &nbsp; download | {med['download_s'] * 1000:.0f} ms | |")
    print(f"| &nbsp; verify (sha256 + signature + checks) | {med['verify_s'] * 1000:.0f} ms | |")
    print(f"| &nbsp; validate (child process: load, golden, latency) | {med['validate_s'] * 1000:.0f} ms | |")
    print(f"| &nbsp; install slot + hot swap | {med['install_swap_s'] * 1000:.0f} ms | |")
    print(f"| failed requests during {args.runs} updates | {sum(r['failed_requests'] for r in act)} of "
          f"{sum(r['requests'] for r in act)} | 0 |")
    print(f"| failed requests during {hs['swaps']} bare hot swaps | {hs['failed_requests']} of {hs['requests']} | 0 |")
    ho = results["host_overhead_us"]
    print(f"| ModelHost.infer overhead per call (tiny model: engine {ho['engine_us']:.1f} us) | "
          f"{ho['overhead_us']:.2f} us | |")
    print(f"| failed probation -> previous model serving | {fp['revert_ms']:.2f} ms ({fp['final']}) | <= 1000 ms |")
    print(f"| probation start -> rolled back (verdict needs 100 live inferences) | "
          f"{fp['probation_to_rolled_back_ms']:.0f} ms | |")
    print(f"| failed requests during the failed update | {fp['failed_requests']} of {fp['requests']} | 0 |")
    print(f"\nFailed probation reason: {fp['reason']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    if args.plot and plot_data is not None:
        plot(plot_data, Path(args.plot))
    return 0


def plot(data, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0, timeline, records = data
    fig, ax = plt.subplots(figsize=(9, 3.6))
    ts = np.array([r[0] - t0 for r in records])
    lat = np.array([r[1] * 1000 for r in records])
    ok = np.array([r[2] for r in records])
    ax.scatter(ts[ok], lat[ok], s=4, color="tab:blue", label="live request latency (ms)")
    if (~ok).any():
        ax.scatter(ts[~ok], lat[~ok], s=12, color="red", label="failed request")
    colors = plt.cm.tab10.colors
    for i, (ts_state, _, state) in enumerate(timeline):
        ax.axvline(ts_state - t0, color=colors[i % 10], linestyle="--", linewidth=1)
        ax.text(ts_state - t0, ax.get_ylim()[1] * (0.95 - 0.08 * (i % 4)), state, rotation=0, fontsize=7,
                color=colors[i % 10])
    ax.set_xlabel("seconds since the update command")
    ax.set_ylabel("latency (ms)")
    ax.set_title("One OTA update of a ~4 MB model under live traffic")
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
