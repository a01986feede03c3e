"""Benchmark the fleet tool against fleet size with simulated devices; print markdown, write JSON/PNG.

    .venv/bin/python scripts/bench_fleet.py --out bench/fleet.json --plot bench/fleet.png [--sizes 1000,5000,10000]

For each fleet size a private Mosquitto and one simulator process (``python -m edgefleet.testing.simulator``,
all devices on one connection, no model) are started; then ``edge-fleet`` runs as its own
process and its wall time and peak RSS are read from ``wait4``:

* ``devices --json``: read every retained state (settle window 0.4 s included);
* ``deploy --canary 1% --wave-base 5%-of-fleet --wave-factor 2``: a full staged rollout where every
  simulated device walks the seven OTA states (7 events + 1 reply + 1 retained state each);
* ``watch --frames 3 --interval 1`` while every device sends telemetry every ``--telemetry-interval``
  seconds (so the message rate grows with the fleet);
* the controller path (``--controller``): the same rollout submitted with ``deploy --controller`` to
  an ``edge-fleet serve`` on a private PostgreSQL; CPU is the controller's (read from /proc from
  submit to the rollout's end) plus the submitting client's, compared per device with the
  in-process SQLite deploy above (target: <= 1.5x);
* the exporter (``--controller``): ``edge-fleet exporter`` holding every device's telemetry: its RSS
  (target <= 200 MB at 10,000 devices), one scrape's wall time (target <= 1 s) and the time one
  background render takes.

The simulator shares the two cores with the fleet tool, so absolute times include its work;
the question answered is whether the fleet tool's cost grows about linearly with fleet size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edgefleet.testing.broker import MosquittoBroker

REPO = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], timeout: float = 600) -> dict[str, Any]:
    """Run ``cmd``; wall seconds, peak RSS (MB) and exit code of that one child."""
    start = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err)
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        wall = time.monotonic() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return {"wall_s": round(wall, 3), "max_rss_mb": round(usage.ru_maxrss / 1024, 1),
                "cpu_s": round(usage.ru_utime + usage.ru_stime, 3), "exit": proc.returncode,
                "stdout": out.read().decode(errors="replace"), "stderr": err.read().decode(errors="replace")}


def start_simulator(url: str, count: int, telemetry_s: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-m", "edgefleet.testing.simulator", "--broker", url, "--count", str(count),
                             "--prefix", "b", "--group", "bench", "--step-delay", "0.01",
                             "--telemetry-interval", str(telemetry_s)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _ready(proc, "simulator")
    return proc


def make_artifact(directory: Path) -> Path:
    from edgefleet.testing.simulator import write_placeholder_artifact

    return write_placeholder_artifact(directory, "2")


def bench_size(n: int, workdir: Path, telemetry_s: float, controller: bool = False) -> dict[str, Any]:
    fleet = [sys.executable, "-m", "fleet.cli"]
    row: dict[str, Any] = {"devices": n}
    with MosquittoBroker(workdir / f"broker-{n}") as broker:
        sim = start_simulator(broker.url, n, telemetry_s=0)
        try:
            r = timed(fleet + ["devices", "--broker", broker.url, "--json"])
            found = len(json.loads(r["stdout"])) if r["exit"] == 0 else 0
            row["devices_cmd"] = {k: r[k] for k in ("wall_s", "max_rss_mb", "cpu_s", "exit")} | {"found": found}
            art = make_artifact(workdir / f"art-{n}")
            r = timed(fleet + ["deploy", str(art), "--broker", broker.url, "--all", "--canary", "1%",
                               "--wave-base", str(max(1, n // 20)), "--wave-factor", "2",
                               "--device-timeout", "300", "--serve", "127.0.0.1:0", "--json",
                               "--data-dir", str(workdir / f"data-{n}")])
            state = json.loads(r["stdout"])["state"] if r["exit"] in (0, 1) and r["stdout"] else r["stderr"][-300:]
            waves = json.loads(r["stdout"])["waves"] if r["exit"] in (0, 1) and r["stdout"] else None
            row["deploy_cmd"] = {k: r[k] for k in ("wall_s", "max_rss_mb", "cpu_s", "exit")} | {
                "state": state, "waves": waves}
        finally:
            sim.terminate()
            sim.wait(60)
        sim = start_simulator(broker.url, n, telemetry_s=telemetry_s)
        try:
            time.sleep(min(telemetry_s, 5))
            r = timed(fleet + ["watch", "--broker", broker.url, "--frames", "3", "--interval", "1"])
            lines = r["stdout"].strip().splitlines()
            row["watch_cmd"] = {k: r[k] for k in ("wall_s", "max_rss_mb", "cpu_s", "exit")} | {
                "totals": lines[-1] if lines else r["stderr"][-200:],
                "telemetry_msgs_per_s": round(n / telemetry_s, 1)}
        finally:
            sim.terminate()
            sim.wait(60)
        if controller:
            row.update(bench_controller(n, workdir, broker.url, row["deploy_cmd"]["cpu_s"], telemetry_s))
    return row


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _ready(proc: subprocess.Popen[str], what: str) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("ready"):
        proc.kill()
        raise RuntimeError(f"{what} did not start: {line} {proc.stderr.read() if proc.stderr else ''}")
    return line


def bench_controller(n: int, workdir: Path, broker_url: str, in_process_cpu_s: float | None,
                     telemetry_s: float) -> dict[str, Any]:
    """The controller on PostgreSQL driving the same rollout, and the exporter holding n devices."""
    from edgefleet.testing.postgres import PostgresServer
    from fleet.store import open_store

    fleet = [sys.executable, "-m", "fleet.cli"]
    token = workdir / "token"
    token.write_text("bench-token-0123456789abcdef\n")
    row: dict[str, Any] = {}
    with PostgresServer() as pg:
        url = pg.create_database("bench")
        subprocess.run(fleet + ["migrate", "--state", url], cwd=REPO, check=True, capture_output=True)
        sim = start_simulator(broker_url, n, telemetry_s=0)
        ctl = subprocess.Popen(fleet + ["serve", "--state", url, "--broker", broker_url, "--token-file", str(token),
                                        "--listen", "127.0.0.1:0", "--metrics", "off", "--serve", "127.0.0.1:0",
                                        "--data-dir", str(workdir / f"ctl-{n}")],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            words = _ready(ctl, "controller").split()
            api = words[words.index("api") + 1]
            art = make_artifact(workdir / f"art-ctl-{n}")
            cpu0, start = _proc_cpu_s(ctl.pid), time.monotonic()
            r = timed(fleet + ["deploy", str(art), "--controller", api, "--token-file", str(token), "--all",
                               "--canary", "1%", "--wave-base", str(max(1, n // 20)), "--wave-factor", "2",
                               "--device-timeout", "300", "--json"])
            rollout_id = json.loads(r["stdout"])["rollout_id"] if r["exit"] == 0 else None
            state = r["stderr"][-300:]
            store = open_store(url)
            try:
                while rollout_id and time.monotonic() - start < 900:
                    rollout = store.rollout(rollout_id)
                    if rollout.terminal:
                        state = rollout.state.value
                        break
                    time.sleep(0.2)
            finally:
                store.close()
            wall = time.monotonic() - start
            ctl_cpu = _proc_cpu_s(ctl.pid) - cpu0
            total = ctl_cpu + r["cpu_s"]
            row["controller_deploy"] = {
                "wall_s": round(wall, 2), "controller_cpu_s": round(ctl_cpu, 2), "client_cpu_s": r["cpu_s"],
                "cpu_per_device_us": round(1e6 * total / n), "max_rss_mb": round(_proc_rss_mb(ctl.pid), 1),
                "state": state, "vs_in_process": round(total / in_process_cpu_s, 2) if in_process_cpu_s else None}
        finally:
            ctl.terminate()
            ctl.wait(30)
            sim.terminate()
            sim.wait(60)
    row["exporter"] = bench_exporter(n, broker_url, telemetry_s)
    return row


def bench_exporter(n: int, broker_url: str, telemetry_s: float) -> dict[str, Any]:
    import urllib.request

    sim = start_simulator(broker_url, n, telemetry_s=telemetry_s)
    exp = subprocess.Popen([sys.executable, "-m", "fleet.cli", "exporter", "--broker", broker_url,
                            "--listen", "127.0.0.1:0", "--refresh", "5"],
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = _ready(exp, "exporter").split()[-1]
        time.sleep(2 * telemetry_s + 6)  # every device sent telemetry twice; a render happened since
        start = time.monotonic()
        with urllib.request.urlopen(url, timeout=30) as resp:
            body = resp.read()
        scrape = time.monotonic() - start
        lines = body.decode().splitlines()
        values = {line.split()[0]: float(line.split()[-1]) for line in lines if line.startswith("edgefleet_exporter_")}
        return {"devices_tracked": int(values.get("edgefleet_exporter_devices", 0)),
                "rss_mb": round(_proc_rss_mb(exp.pid), 1), "scrape_s": round(scrape, 3),
                "render_s": round(values.get("edgefleet_exporter_render_seconds", 0.0), 2),
                "samples": sum(1 for line in lines if line and not line.startswith("#")),
                "body_mb": round(len(body) / 1e6, 1)}
    finally:
        exp.terminate()
        exp.wait(30)
        sim.terminate()
        sim.wait(60)


def markdown_controller(rows: list[dict[str, Any]]) -> str:
    out = [("| devices | in-process SQLite deploy CPU/device | controller on PostgreSQL CPU/device (controller + "
            "client) | ratio (target <= 1.5) | controller wall s, RSS MB, result | exporter devices, RSS MB "
            "(target <= 200) | scrape s (target <= 1) | render s, samples |"),
           "|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        if "controller_deploy" not in r:
            continue
        c, e = r["controller_deploy"], r["exporter"]
        base = 1e6 * r["deploy_cmd"]["cpu_s"] / r["devices"]
        out.append(f"| {r['devices']} | {base:.0f} us | {c['cpu_per_device_us']} us ({c['controller_cpu_s']} + "
                   f"{c['client_cpu_s']} s) | {c['vs_in_process']} | {c['wall_s']}, {c['max_rss_mb']:.0f}, "
                   f"{c['state']} | {e['devices_tracked']}, {e['rss_mb']:.0f} | {e['scrape_s']} | "
                   f"{e['render_s']}, {e['samples']} |")
    return "\n".join(out) + "\n"


def markdown(rows: list[dict[str, Any]]) -> str:
    out = [("| devices | `devices` wall s / CPU s / MB | `deploy` wall s / CPU s / MB | deploy CPU per device | "
            "waves, result | `watch` 3 frames wall s / CPU s / MB | telemetry msg/s during watch |"),
           "|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        d, p, w = r["devices_cmd"], r["deploy_cmd"], r["watch_cmd"]
        per = 1e6 * p["cpu_s"] / r["devices"]
        out.append(f"| {r['devices']} | {d['wall_s']:.2f} / {d['cpu_s']:.2f} / {d['max_rss_mb']:.0f} | "
                   f"{p['wall_s']:.1f} / {p['cpu_s']:.1f} / {p['max_rss_mb']:.0f} | {per:.0f} us | "
                   f"{p['waves']}, {p['state']} | {w['wall_s']:.2f} / {w['cpu_s']:.2f} / {w['max_rss_mb']:.0f} | "
                   f"{w['telemetry_msgs_per_s']:.0f} |")
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        k = b["devices"] / a["devices"]

        def ratio(key: str, field: str = "cpu_s") -> float:
            return float(b[key][field]) / max(float(a[key][field]), 1e-3)

        out.append("")
        out.append(f"From {a['devices']} to {b['devices']} devices ({k:.0f}x): CPU time of `devices` "
                   f"x{ratio('devices_cmd'):.1f}, of `deploy` x{ratio('deploy_cmd'):.1f}, of `watch` "
                   f"x{ratio('watch_cmd'):.1f} (process start-up is a fixed share at small sizes); peak RSS "
                   f"of `deploy` {a['deploy_cmd']['max_rss_mb']:.0f} -> {b['deploy_cmd']['max_rss_mb']:.0f} MB. "
                   "Deploy wall time is mostly the single-threaded simulator producing ~9 messages per device.")
    return "\n".join(out) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["devices"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("devices_cmd", "devices"), ("deploy_cmd", "deploy"), ("watch_cmd", "watch (3 frames)")):
        ax1.plot(sizes, [r[key]["cpu_s"] for r in rows], marker="o", label=label)
        ax2.plot(sizes, [r[key]["max_rss_mb"] for r in rows], marker="o", label=label)
    ax1.set_xlabel("simulated devices")
    ax1.set_ylabel("edge-fleet CPU time (s)")
    ax2.set_xlabel("simulated devices")
    ax2.set_ylabel("edge-fleet peak RSS (MB)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("edge-fleet cost against fleet size (simulated devices, one Mosquitto)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,5000,10000")
    parser.add_argument("--telemetry-interval", type=float, default=10.0, help="seconds, for the watch run")
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--plot", help="write a PNG here")
    parser.add_argument("--render", metavar="JSON", help="only print the table (and plot) of an earlier --out")
    parser.add_argument("--controller", action="store_true",
                        help="also the controller on PostgreSQL and the exporter (needs PostgreSQL binaries)")
    args = parser.parse_args()
    if args.render:
        rows = json.loads(Path(args.render).read_text())["rows"]
        print(markdown(rows))
        print(markdown_controller(rows))
        if args.plot:
            plot(rows, Path(args.plot))
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        for n in sizes:
            print(f"fleet size {n} ...", file=sys.stderr, flush=True)
            rows.append(bench_size(n, Path(tmp), args.telemetry_interval, controller=args.controller))
    print("Wall time, CPU time and peak RSS of one `edge-fleet` process per command "
          "(simulator in a separate process on the same cores).\n")
    print(markdown(rows))
    if args.controller:
        print(markdown_controller(rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"rows": rows, "telemetry_interval_s": args.telemetry_interval},
                                             indent=2))
    if args.plot:
        plot(rows, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
