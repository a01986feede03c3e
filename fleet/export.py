"""``edge-fleet export``: record device messages for a while into JSON Lines or CSV.

JSON Lines keeps every state, telemetry and event message as received; CSV keeps one row per
telemetry message with the fields dashboards use. The file is written next to its final name and
renamed at the end, so an interrupted export leaves nothing half-written.
"""

from __future__ import annotations

import csv
import json
import os
import queue
import tempfile
import time
from pathlib import Path
from typing import Any

from edgefleet.atomic import fsync_dir
from edgefleet.errors import ConfigError
from edgefleet.messages import decode
from edgefleet.mqtt import BrokerAccess, connect
from edgefleet.topics import all_devices, parse_device_topic
from fleet.watch import telemetry_fields

__all__ = ["CSV_COLUMNS", "export"]

CSV_COLUMNS = ("received", "ts", "device_id", "seq", "model_version", "inferences", "throughput",
               "p50", "p95", "p99", "cache_hit_rate", "errors", "cpu_percent", "rss_mb", "temp_c",
               "disk_free_mb", "drift", "drift_alert")


def _csv_row(received: float, device_id: str, t: dict[str, Any]) -> dict[str, Any]:
    f = telemetry_fields(t)
    model = t.get("model") if isinstance(t.get("model"), dict) else {}
    return {"received": f"{received:.3f}", "ts": t.get("ts"), "device_id": device_id, "seq": t.get("seq"),
            "model_version": model.get("version"), "inferences": t.get("inferences"),
            "throughput": f["throughput"], "p50": f["p50"], "p95": f["p95"], "p99": f["p99"],
            "cache_hit_rate": f["cache_hit_rate"], "errors": f["errors"], "cpu_percent": t.get("cpu_percent"),
            "rss_mb": t.get("rss_mb"), "temp_c": t.get("temp_c"), "disk_free_mb": t.get("disk_free_mb"),
            "drift": f["drift"], "drift_alert": f["drift_alert"]}


def export(broker: str | BrokerAccess, out: Path | str, duration_s: float = 10.0) -> int:
    """Record for ``duration_s`` seconds; returns the number of records written.

    Raises:
        ConfigError: the file extension is not .jsonl / .csv or the directory does not exist.
        TransportError: the broker cannot be reached.
    """
    out = Path(out)
    fmt = out.suffix.lower()
    if fmt not in (".jsonl", ".csv"):
        raise ConfigError(f"--out {out}: expected a .jsonl or .csv file name")
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: directory {out.parent} does not exist")
    if duration_s <= 0:
        raise ConfigError(f"--duration {duration_s}: expected seconds > 0")
    with connect(broker) as client:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        count = 0
        try:
            with os.fdopen(fd, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS) if fmt == ".csv" else None
                if writer:
                    writer.writeheader()
                client.subscribe([all_devices("telemetry")] if writer else
                                 [all_devices(k) for k in ("state", "telemetry", "events")])
                deadline = time.monotonic() + duration_s
                while (left := deadline - time.monotonic()) > 0:
                    try:
                        msg = client.messages.get(timeout=left)
                    except queue.Empty:
                        break
                    parsed = parse_device_topic(msg.topic)
                    if not parsed or not msg.payload:
                        continue
                    try:
                        payload = decode(msg.payload)
                    except (ValueError, UnicodeDecodeError):
                        continue
                    received = time.time()
                    if writer:
                        writer.writerow(_csv_row(received, parsed[0], payload))
                    else:
                        fh.write(json.dumps({"received": round(received, 3), "device_id": parsed[0],
                                             "kind": parsed[1], "retained": msg.retain, "payload": payload},
                                            separators=(",", ":")) + "\n")
                    count += 1
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, out)
            fsync_dir(out.parent)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return count
