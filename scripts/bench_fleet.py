"""Benchmark the fleet tool against fleet size with simulated devices, on Mosquitto and a NATS cluster.

    .venv/bin/python scripts/bench_fleet.py --out bench/fleet.json --plot bench/fleet.png \
        [--sizes 1000,5000,10000] [--engine mosquitto|nats-cluster|both] [--steps devices,deploy,watch]

For each engine and fleet size a private broker is started on free loopback ports:

* ``mosquitto``: one Mosquitto 2 (MQTT 5), with ``sys_interval 1`` so its ``$SYS`` byte counters
  can be read before and after the rollout, and ``max_queued_messages`` raised so a burst of
  answers to the one fleet-tool connection is never dropped;
* ``nats-cluster``: three routed ``nats-server`` nodes with JetStream and the MQTT 3.1.1 listener,
  MQTT streams replicated on all three (``stream_replicas: 3``), limits raised for the benchmark
  (slow-consumer buffer, write deadline, MQTT ack wait and ack-pending, JetStream storage), and each
  node's ``/varz`` monitoring port for its byte counters. ``edge-fleet`` gets all three nodes as
  ``--broker URL,URL,URL``; the simulator processes are spread over the nodes.

The devices are played by ``ceil(N / --devices-per-sim)`` simulator processes (this script run
as ``--sim-worker``: :class:`edgefleet.testing.simulator.Simulator` with byte counters around its
one MQTT connection, no model), each with its own connection. Keep ``--devices-per-sim`` at or below
5,000: a simulated device publishes 8 QoS 1 messages within ~0.1 s of its command, and paho keeps
unacknowledged publishes in a dict keyed by the 16-bit message id, so a connection with more than
65,535 publishes waiting (one process answering a wave of 10,000 devices) silently overwrites, and
loses, the oldest ones; the devices then time out. ``edge-fleet`` runs as its own
process; its wall time, CPU time and peak RSS are read from ``wait4`` (``ru_maxrss`` of that child):

* ``devices --json``: read every retained state (settle window 0.4 s included);
* ``deploy --canary 1% --wave-base 5%-of-fleet --wave-factor 2 --device-timeout T`` (T = 300 s, or
  longer at 50,000: see :func:`device_timeout_s`): a full staged rollout where every
  simulated device walks the seven OTA states (7 events + 1 reply + 1 retained state each).
  Targets: CPU per device <= 2 ms, peak RSS <= 400 MB at 50,000 devices, and <= 16 KB per device
  through the broker. Bytes are counted two ways: *rollout messages*, the topic + payload (+ MQTT 5
  properties) bytes every simulator received (for its own devices) and published from the deploy's
  start to its end, i.e. each message of the rollout once (commands in; replies, events, states
  out; no protocol overhead); and the *broker's counter*: Mosquitto's ``$SYS/broker/bytes/received + sent`` (every
  byte on every connection, MQTT headers and PUBACKs included, and the retained states the deploy
  reads at its start), or for NATS the sum of ``in_bytes + out_bytes`` in ``/varz`` over the three
  nodes (which also counts route traffic and JetStream replication between the nodes). With more
  than one simulator process the broker's counter also includes each command's delivery to every
  other process (the simulator subscribes to all devices' commands), which a real fleet does not have;
* ``watch --frames 3 --interval 1`` while every device sends telemetry every ``--telemetry-interval``
  seconds (so the message rate grows with the fleet);
* the controller path (``--controller``, Mosquitto only): the same rollout submitted with
  ``deploy --controller`` to an ``edge-fleet serve`` on a private PostgreSQL; CPU is the
  controller's (read from /proc from submit to the rollout's end) plus the submitting client's,
  compared per device with the in-process SQLite deploy above (target: <= 1.5x);
* the exporter (``--controller``): ``edge-fleet exporter`` holding every device's telemetry: its RSS
  (target <= 200 MB at 10,000 devices), one scrape's wall time (target <= 1 s) and the time one
  background render takes.

The simulators and the brokers share the cores with the fleet tool, so wall times include their
work; CPU and RSS are the fleet tool's own. All figures are host figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgefleet.testing.broker import MosquittoBroker, free_port
from edgefleet.testing.nats import NatsCluster, NatsServer

ENGINES = ("mosquitto", "nats-cluster")
TARGET_CPU_US = 2000
TARGET_RSS_MB = 400
TARGET_BYTES = 16 * 1024


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


# -- simulated devices -----------------------------------------------------------------------------
def sim_worker(args: argparse.Namespace) -> int:
    """One simulator process: ``--count`` devices on one connection, byte counters around it.

    stdin: ``counts`` prints the counters as one JSON line; ``stop`` (or EOF) publishes every
    device offline and exits.
    """
    from edgefleet import mqtt as m
    from edgefleet.testing.simulator import Simulator
    from edgefleet.topics import parse_device_topic

    counts = {"in_msgs": 0, "in_bytes": 0, "out_msgs": 0, "out_bytes": 0}
    # Every simulator process subscribes to every device's commands (a wildcard) and ignores the
    # others' devices: count only what is addressed to this process's devices (or its group).
    own: set[str] = set()
    lock = threading.Lock()
    send, handle = m.MqttConnection.send, m.MqttConnection._handle_message

    def props_len(props: Any) -> int:
        if props is None:
            return 0
        rt, cd = getattr(props, "ResponseTopic", None), getattr(props, "CorrelationData", None)
        return (len(rt.encode()) if isinstance(rt, str) else 0) + (len(cd) if isinstance(cd, bytes) else 0)

    def counting_send(self: Any, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                      properties: Any = None) -> Any:
        info = send(self, topic, payload, qos=qos, retain=retain, properties=properties)
        sent_props = properties if self.protocol == "5" else None
        with lock:
            counts["out_msgs"] += 1
            counts["out_bytes"] += len(topic.encode()) + len(payload) + props_len(sent_props)
        return info

    def counting_handle(self: Any, client: Any, userdata: Any, msg: Any) -> None:
        parsed = parse_device_topic(msg.topic)
        if parsed is not None and parsed[0] not in own:
            handle(self, client, userdata, msg)
            return
        with lock:
            counts["in_msgs"] += 1
            counts["in_bytes"] += len(msg.topic.encode()) + len(msg.payload) + props_len(getattr(msg, "properties", None))
        handle(self, client, userdata, msg)

    m.MqttConnection.send = counting_send  # type: ignore[method-assign]
    m.MqttConnection._handle_message = counting_handle  # type: ignore[method-assign]
    sim = Simulator(args.broker, count=args.count, prefix=args.prefix, group="bench", step_delay=args.step_delay,
                    telemetry_interval=args.telemetry_interval)
    own.update(sim.devices)
    sim.start()
    print(f"ready: {args.count} devices on {args.broker}", flush=True)
    for line in sys.stdin:
        if line.strip() == "counts":
            with lock:
                print(json.dumps(counts), flush=True)
        elif line.strip() == "stop":
            break
    try:
        sim.stop()
    except Exception as exc:  # noqa: BLE001 (offline states not all acknowledged in time: irrelevant here)
        print(f"stop: {exc}", file=sys.stderr)
    return 0


class SimFleet:
    """``n`` devices in ``ceil(n / per_process)`` simulator processes, process i on ``urls[i % len(urls)]``."""

    def __init__(self, urls: list[str], n: int, telemetry_s: float, per_process: int, step_delay: float = 0.01) -> None:
        k = max(1, math.ceil(n / per_process))
        sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
        self.procs: list[subprocess.Popen[str]] = []
        for i, count in enumerate(sizes):
            self.procs.append(subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--sim-worker", "--broker", urls[i % len(urls)],
                 "--count", str(count), "--prefix", f"b{i}", "--step-delay", str(step_delay),
                 "--telemetry-interval", str(telemetry_s)],
                cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        try:
            for proc in self.procs:  # they publish their births in parallel
                _ready(proc, "simulator")
        except BaseException:
            self.stop(timeout=5)
            raise

    def counts(self) -> dict[str, int]:
        total = {"in_msgs": 0, "in_bytes": 0, "out_msgs": 0, "out_bytes": 0}
        for proc in self.procs:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write("counts\n")
            proc.stdin.flush()
            for k, v in json.loads(proc.stdout.readline()).items():
                total[k] += v
        return total

    def stop(self, timeout: float = 120) -> None:
        for proc in self.procs:
            try:
                assert proc.stdin is not None
                proc.stdin.write("stop\n")
                proc.stdin.close()
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def make_artifact(directory: Path) -> Path:
    from edgefleet.testing.simulator import write_placeholder_artifact

    return write_placeholder_artifact(directory, "2")


# -- engines ---------------------------------------------------------------------------------------
class MosquittoEngine:
    """One private Mosquitto; its ``$SYS`` byte counters published every second."""

    name = "mosquitto"

    def __init__(self, workdir: Path) -> None:
        self.broker = MosquittoBroker(workdir, extra_config="sys_interval 1\nmax_queued_messages 10000000\n")
        self._sys: dict[str, tuple[float, int]] = {}
        self._monitor: Any = None

    @property
    def fleet_url(self) -> str:
        return self.broker.url

    @property
    def mqtt_urls(self) -> list[str]:
        return [self.broker.url]

    def __enter__(self) -> MosquittoEngine:  # noqa: PYI034 (py3.10: no typing.Self)
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.broker.start()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-sys-monitor")

        def on_message(c: Any, u: Any, msg: Any) -> None:
            self._sys[msg.topic.rsplit("/", 1)[-1]] = (time.monotonic(), int(msg.payload))

        client.on_message = on_message
        client.on_connect = lambda c, u, f, rc, p: c.subscribe([("$SYS/broker/bytes/received", 0),
                                                               ("$SYS/broker/bytes/sent", 0)])
        client.connect("127.0.0.1", self.broker.port)
        client.loop_start()
        self._monitor = client
        return self

    def __exit__(self, *exc: object) -> None:
        if self._monitor is not None:
            self._monitor.disconnect()
            self._monitor.loop_stop()
        self.broker.stop()

    def byte_counter(self) -> int | None:
        """received + sent since the broker started, as of its last $SYS update (published on change,
        at most every second: call it 2 s after the traffic of interest)."""
        got = [self._sys.get(k) for k in ("received", "sent")]
        return sum(g[1] for g in got if g is not None) if all(got) else None

    counter_label = "Mosquitto $SYS bytes received + sent"


class BenchNatsServer(NatsServer):
    """A cluster node with the benchmark's limits and a monitoring port (``/varz``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.http_port = free_port()

    def _config(self) -> str:
        text = super()._config()
        # MQTT: QoS 1 deliveries not acknowledged within ack_wait are redelivered (a slow fleet tool
        # would then see duplicates), at most max_ack_pending unacknowledged per subscription.
        text = text.replace("mqtt { listen:", 'mqtt { ack_wait: "5m", max_ack_pending: 8192, listen:', 1)
        text = text.replace('jetstream { store_dir:', "jetstream { max_memory_store: 1GB, max_file_store: 8GB, store_dir:", 1)
        return text + "\n".join([
            f"http: 127.0.0.1:{self.http_port}",
            "max_connections: 100000",
            "max_pending: 512MB",       # per-connection buffer before a slow consumer is cut off
            'write_deadline: "60s"',
            "",
        ])

    def varz(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/varz", timeout=10) as resp:
            return dict(json.loads(resp.read()))


class NatsClusterEngine(NatsCluster):
    """Three routed nats-server nodes with JetStream and the MQTT listener, with the benchmark's limits."""

    name = "nats-cluster"
    counter_label = "NATS /varz in + out bytes, 3 nodes (incl. routes, JetStream replication)"
    nodes: list[BenchNatsServer]

    def __init__(self, workdir: Path, size: int = 3) -> None:
        super().__init__(workdir, size, node_class=BenchNatsServer, ready_timeout_s=90)

    @property
    def fleet_url(self) -> str:
        return ",".join(self.mqtt_urls)

    def byte_counter(self) -> int | None:
        try:
            return sum(int(v["in_bytes"]) + int(v["out_bytes"]) for v in (n.varz() for n in self.nodes))
        except (OSError, ValueError, KeyError):
            return None

    def rss_mb(self) -> float:
        return sum(_proc_rss_mb(n.proc.pid) for n in self.nodes if n.proc is not None)


def make_engine(name: str, workdir: Path) -> MosquittoEngine | NatsClusterEngine:
    return MosquittoEngine(workdir) if name == "mosquitto" else NatsClusterEngine(workdir)


# -- one fleet size on one engine --------------------------------------------------------------------
def bench_size(engine_name: str, n: int, workdir: Path, telemetry_s: float, steps: set[str], per_process: int,
               controller: bool = False) -> dict[str, Any]:
    fleet = [sys.executable, "-m", "fleet.cli"]
    row: dict[str, Any] = {"engine": engine_name, "devices": n, "sim_processes": max(1, math.ceil(n / per_process))}
    timeout = max(600.0, n * 0.06)
    with make_engine(engine_name, workdir / f"{engine_name}-{n}") as engine:
        url = engine.fleet_url
        t0 = time.monotonic()
        sims = SimFleet(engine.mqtt_urls, n, 0, per_process)
        row["sim_start_s"] = round(time.monotonic() - t0, 1)
        try:
            if "devices" in steps:
                r = timed(fleet + ["devices", "--broker", url, "--json"], timeout=timeout)
                found = len(json.loads(r["stdout"])) if r["exit"] == 0 else 0
                row["devices_cmd"] = {k: r[k] for k in ("wall_s", "max_rss_mb", "cpu_s", "exit")} | {"found": found}
            if "deploy" in steps:
                row["deploy_cmd"] = bench_deploy(fleet, engine, sims, n, url, workdir, timeout)
        finally:
            sims.stop()
        if "watch" in steps:
            sims = SimFleet(engine.mqtt_urls, n, telemetry_s, per_process)
            try:
                time.sleep(min(telemetry_s, 5))
                r = timed(fleet + ["watch", "--broker", url, "--frames", "3", "--interval", "1"])
                lines = r["stdout"].strip().splitlines()
                row["watch_cmd"] = {k: r[k] for k in ("wall_s", "max_rss_mb", "cpu_s", "exit")} | {
                    "totals": lines[-1] if lines else r["stderr"][-200:],
                    "telemetry_msgs_per_s": round(n / telemetry_s, 1)}
            finally:
                sims.stop()
        if controller and engine_name == "mosquitto" and "deploy_cmd" in row:
            row.update(bench_controller(n, workdir, url, row["deploy_cmd"]["cpu_s"], telemetry_s, per_process))
    return row


def device_timeout_s(n: int) -> int:
    """The deploy's --device-timeout: 300 s, or enough for the largest wave (40 % of the fleet) to
    get through the broker at 25 devices/s (10 messages each: the NATS cluster's pace on these two
    cores with other work running; 12,000 of a 20,000 wave answered within 300 s). The benchmark
    measures the fleet tool: a shorter timeout times out devices whose answers are only queued."""
    return max(300, round(0.4 * n / 25))


def bench_deploy(fleet: list[str], engine: Any, sims: SimFleet, n: int, url: str, workdir: Path,
                 timeout: float) -> dict[str, Any]:
    art = make_artifact(workdir / f"art-{engine.name}-{n}")
    time.sleep(2.5)  # the births are through; the broker's counter is current
    before, counter_before = sims.counts(), engine.byte_counter()
    r = timed(fleet + ["deploy", str(art), "--broker", url, "--all", "--canary", "1%",
                       "--wave-base", str(max(1, n // 20)), "--wave-factor", "2",
                       "--device-timeout", str(device_timeout_s(n)), "--serve", "127.0.0.1:0", "--json",
                       "--data-dir", str(workdir / f"data-{engine.name}-{n}")], timeout=timeout)
    time.sleep(2.5)  # the last PUBACKs; a $SYS update after them
    after, counter_after = sims.counts(), engine.byte_counter()
    out: dict[str, Any] = {k: r[k] for k in ("wall_s", "max_rss_mb", "cpu_s", "exit")}
    try:
        summary = json.loads(r["stdout"]) if r["exit"] in (0, 1) and r["stdout"] else None
    except ValueError:
        summary = None
    if summary:
        counts = summary.get("counts", {})
        out |= {"state": summary["state"], "waves": summary["waves"], "targeted": len(summary["executions"]),
                "succeeded": counts.get("succeeded", counts.get("SUCCEEDED"))}
    else:
        out |= {"state": r["stderr"][-300:], "waves": None, "targeted": None, "succeeded": None}
    sim_in = after["in_bytes"] - before["in_bytes"]
    sim_out = after["out_bytes"] - before["out_bytes"]
    out["rollout_bytes_per_device"] = round((sim_in + sim_out) / n)
    out["command_bytes_per_device"] = round(sim_in / n)
    out["rollout_msgs_per_device"] = round((after["in_msgs"] + after["out_msgs"] - before["in_msgs"]
                                            - before["out_msgs"]) / n, 2)
    out["broker_bytes_per_device"] = (round((counter_after - counter_before) / n)
                                      if counter_before is not None and counter_after is not None else None)
    out["broker_counter"] = engine.counter_label
    return out


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
                     telemetry_s: float, per_process: int) -> dict[str, Any]:
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
        sim = SimFleet([broker_url], n, 0, per_process)
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
            sim.stop()
    row["exporter"] = bench_exporter(n, broker_url, telemetry_s, per_process)
    return row


def bench_exporter(n: int, broker_url: str, telemetry_s: float, per_process: int) -> dict[str, Any]:
    sim = SimFleet([broker_url], n, telemetry_s, per_process)
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
        sim.stop()


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


def _kb(b: int | None) -> str:
    return "-" if b is None else f"{b / 1024:.1f} KB"


def markdown_engine(engine: str, rows: list[dict[str, Any]]) -> str:
    label = {"mosquitto": "Mosquitto 2 (one node, MQTT 5)",
             "nats-cluster": "NATS cluster (3 routed nodes, JetStream R3, MQTT 3.1.1 gateway)"}.get(engine, engine)
    out = [f"**{label}**\n",
           ("| devices | sim procs | `devices` wall s / CPU s / MB | `deploy` wall s / CPU s | deploy CPU per device "
            "(target <= 2 ms) | `deploy` peak RSS MB (target <= 400 at 50,000) | rollout messages per device: "
            "count, bytes (target <= 16 KB) | broker's counter per device | waves, succeeded / targeted, result | "
            "`watch` 3 frames wall s / CPU s / MB at msg/s |"),
           "|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        d, p, w = r.get("devices_cmd"), r.get("deploy_cmd"), r.get("watch_cmd")
        dcell = f"{d['wall_s']:.2f} / {d['cpu_s']:.2f} / {d['max_rss_mb']:.0f} ({d['found']} found)" if d else "-"
        if p:
            per = 1e6 * p["cpu_s"] / r["devices"]
            ok = "met" if per <= TARGET_CPU_US else "MISSED"
            rss_ok = "" if r["devices"] < 50_000 else (" met" if p["max_rss_mb"] <= TARGET_RSS_MB else " MISSED")
            b = p.get("rollout_bytes_per_device")
            bytes_ok = "" if b is None else (" met" if b <= TARGET_BYTES else " MISSED")
            pcells = (f"{p['wall_s']:.1f} / {p['cpu_s']:.1f} | {per:.0f} us {ok} | {p['max_rss_mb']:.0f}{rss_ok} | "
                      f"{p.get('rollout_msgs_per_device', '-')}, {_kb(b)}{bytes_ok} "
                      f"(commands {_kb(p.get('command_bytes_per_device'))}) | {_kb(p.get('broker_bytes_per_device'))} | "
                      f"{p['waves']}, {p.get('succeeded', '-')} / {p.get('targeted', '-')}, {str(p['state'])[:120]}")
        else:
            pcells = "- | - | - | - | - | -"
        wcell = (f"{w['wall_s']:.2f} / {w['cpu_s']:.2f} / {w['max_rss_mb']:.0f} at {w['telemetry_msgs_per_s']:.0f}"
                 if w else "-")
        out.append(f"| {r['devices']} | {r.get('sim_processes', 1)} | {dcell} | {pcells} | {wcell} |")
    deployed = [r for r in rows if r.get("deploy_cmd")]
    if len(deployed) >= 2:
        a, b = deployed[0], deployed[-1]
        k = b["devices"] / a["devices"]
        cpu = b["deploy_cmd"]["cpu_s"] / max(a["deploy_cmd"]["cpu_s"], 1e-3)
        out.append("")
        out.append(f"From {a['devices']} to {b['devices']} devices ({k:.0f}x): `deploy` CPU x{cpu:.1f}, peak RSS "
                   f"{a['deploy_cmd']['max_rss_mb']:.0f} -> {b['deploy_cmd']['max_rss_mb']:.0f} MB.")
    if rows and rows[0].get("deploy_cmd", {}).get("broker_counter"):
        out.append("")
        out.append(f"Broker's counter: {rows[0]['deploy_cmd']['broker_counter']}, from just before `deploy` "
                   "started to just after it ended, divided by devices.")
    return "\n".join(out) + "\n"


def markdown(rows: list[dict[str, Any]]) -> str:
    parts = []
    for engine in ENGINES + tuple(sorted({r.get("engine", "mosquitto") for r in rows} - set(ENGINES))):
        mine = [r for r in rows if r.get("engine", "mosquitto") == engine]
        if mine:
            parts.append(markdown_engine(engine, mine))
    return "\n".join(parts)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 4))
    for engine in ENGINES:
        mine = [r for r in rows if r.get("engine", "mosquitto") == engine and r.get("deploy_cmd")]
        if not mine:
            continue
        sizes = [r["devices"] for r in mine]
        ax1.plot(sizes, [1e3 * r["deploy_cmd"]["cpu_s"] / r["devices"] for r in mine], marker="o", label=engine)
        ax2.plot(sizes, [r["deploy_cmd"]["max_rss_mb"] for r in mine], marker="o", label=engine)
        ax3.plot(sizes, [(r["deploy_cmd"].get("rollout_bytes_per_device") or 0) / 1024 for r in mine], marker="o",
                 label=f"{engine}: rollout messages")
        if any(r["deploy_cmd"].get("broker_bytes_per_device") for r in mine):
            ax3.plot(sizes, [(r["deploy_cmd"].get("broker_bytes_per_device") or 0) / 1024 for r in mine],
                     marker="x", linestyle="--", label=f"{engine}: broker's counter")
    for ax, ylabel, target in ((ax1, "deploy CPU per device (ms)", TARGET_CPU_US / 1000),
                               (ax2, "deploy peak RSS (MB)", TARGET_RSS_MB), (ax3, "KB per device", 16)):
        ax.axhline(target, color="grey", linestyle=":", label="target")
        ax.set_xlabel("simulated devices")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("edge-fleet deploy against fleet size (simulated devices; host figures)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,5000,10000")
    parser.add_argument("--engine", choices=(*ENGINES, "both"), default="both")
    parser.add_argument("--steps", default="devices,deploy,watch", help="comma list of devices, deploy, watch")
    parser.add_argument("--devices-per-sim", type=int, default=5_000,
                        help="devices per simulator process (each its own connection); keep a wave's messages on "
                             "one connection under 65,535 (paho's message ids: see the module docstring)")
    parser.add_argument("--telemetry-interval", type=float, default=10.0, help="seconds, for the watch run")
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--plot", help="write a PNG here")
    parser.add_argument("--render", metavar="JSON", help="only print the table (and plot) of an earlier --out")
    parser.add_argument("--controller", action="store_true",
                        help="also the controller on PostgreSQL and the exporter, on Mosquitto (needs PostgreSQL)")
    worker = parser.add_argument_group("internal: one simulator process")
    worker.add_argument("--sim-worker", action="store_true", help=argparse.SUPPRESS)
    worker.add_argument("--broker", help=argparse.SUPPRESS)
    worker.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    worker.add_argument("--prefix", default="b", help=argparse.SUPPRESS)
    worker.add_argument("--step-delay", type=float, default=0.01, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sim_worker:
        return sim_worker(args)
    if args.render:
        rows = json.loads(Path(args.render).read_text())["rows"]
        print(markdown(rows))
        print(markdown_controller(rows))
        if args.plot:
            plot(rows, Path(args.plot))
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    engines = list(ENGINES) if args.engine == "both" else [args.engine]
    steps = {s.strip() for s in args.steps.split(",") if s.strip()}
    rows: list[dict[str, Any]] = []
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())

    def save() -> None:
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"rows": rows, "telemetry_interval_s": args.telemetry_interval,
                                                  "started": started, "cpus": os.cpu_count()}, indent=2))

    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        for n in sizes:  # both engines at one size, side by side, before the next size
            for engine in engines:
                print(f"{engine}: fleet size {n} ...", file=sys.stderr, flush=True)
                t0 = time.monotonic()
                try:
                    rows.append(bench_size(engine, n, Path(tmp), args.telemetry_interval, steps,
                                           args.devices_per_sim, controller=args.controller))
                except Exception as exc:  # noqa: BLE001 (one engine failing at one size must not hide the others)
                    rows.append({"engine": engine, "devices": n, "error": f"{type(exc).__name__}: {exc}"[:500]})
                print(f"   {time.monotonic() - t0:.0f} s: {json.dumps(rows[-1].get('deploy_cmd') or rows[-1])[:400]}",
                      file=sys.stderr, flush=True)
                save()
    print(f"Host figures ({os.cpu_count()} cores shared by the brokers, the simulators and the fleet tool), run "
          f"{started}. Wall time, CPU time and peak RSS of one `edge-fleet` process per command; simulated devices "
          "in separate processes, each with its own connection.\n")
    print(markdown([r for r in rows if "error" not in r]))
    for r in rows:
        if "error" in r:
            print(f"- {r['engine']} at {r['devices']} devices did not complete: {r['error']}")
    if args.controller:
        print(markdown_controller([r for r in rows if "error" not in r]))
    save()
    if args.plot:
        plot([r for r in rows if "error" not in r], Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
