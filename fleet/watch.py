"""``edge-fleet watch``: a live table of the fleet from retained states and telemetry.

Per device: online, model, throughput, p95 latency, cache hit rate, errors, drift, last seen;
then fleet totals. Rendering is O(devices) per frame and ingesting is O(1) per message, so a
busy fleet costs one pass per frame, not per message. Plain text (no escape codes) when stdout is
not a terminal; ``--frames N`` prints N frames and exits.
"""

from __future__ import annotations

import queue
import shutil
import sys
import time
from typing import Any, TextIO

from edgefleet.mqtt import connect
from fleet.registry import STATE_TOPICS, TELEMETRY_TOPICS, Device, Registry, drain_into

__all__ = ["render", "telemetry_fields", "watch", "watch_controller"]

_HEADER = ("DEVICE", "ON", "GROUP", "MODEL", "THRPT/s", "P95ms", "CACHE%", "ERR", "DRIFT", "SEEN")


def _num(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def telemetry_fields(t: dict[str, Any] | None) -> dict[str, Any]:
    """The numbers the table and the CSV export show, from one telemetry payload (missing -> None)."""
    t = t or {}
    lat = t.get("latency_ms") if isinstance(t.get("latency_ms"), dict) else {}
    cache = t.get("cache") if isinstance(t.get("cache"), dict) else {}
    drift = t.get("drift") if isinstance(t.get("drift"), dict) else {}
    hit = cache.get("hit_rate")
    if hit is None and cache.get("lookups"):
        hit = cache.get("hits", 0) / cache["lookups"]
    return {"throughput": t.get("throughput"), "p50": lat.get("p50"), "p95": lat.get("p95"),
            "p99": lat.get("p99"), "cache_hit_rate": hit, "errors": t.get("errors"),
            "drift": drift.get("tvd", drift.get("score")), "drift_alert": drift.get("alert")}


def _ago(ts: float | None, now: float) -> str:
    if ts is None:
        return "-"
    s = max(0.0, now - ts)
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.0f}h"


def _row(d: Device, now: float) -> tuple[str, ...]:
    f = telemetry_fields(d.telemetry)
    model = d.model or {}
    drift = _num(f["drift"], ".2f") + ("!" if f["drift_alert"] else "")
    return (d.device_id, "yes" if d.online else "no", d.group or "-",
            f"{model.get('name', '-')}@{model.get('version', '-')}" if model else "-",
            _num(f["throughput"], ".1f"), _num(f["p95"], ".1f"),
            _num(f["cache_hit_rate"] * 100 if isinstance(f["cache_hit_rate"], (int, float)) else None, ".0f"),
            _num(f["errors"], "d"), drift, _ago(d.seen_ts, now))


def render(registry: Registry, now: float | None = None, group: str | None = None,
           max_rows: int | None = None) -> str:
    """One frame of the table as text."""
    now = time.time() if now is None else now
    devices = [d for d in registry.known() if group is None or d.group == group]
    rows = [_row(d, now) for d in devices]
    shown = rows if max_rows is None else rows[:max_rows]
    widths = [max([len(h)] + [len(r[i]) for r in shown]) for i, h in enumerate(_HEADER)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(_HEADER, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in shown]
    if len(shown) < len(rows):
        lines.append(f"... {len(rows) - len(shown)} more devices")
    online = sum(1 for d in devices if d.online)
    tel = [telemetry_fields(d.telemetry) for d in devices if d.telemetry]
    thr = sum(f["throughput"] or 0 for f in tel)
    errs = sum(f["errors"] or 0 for f in tel)
    p95s = sorted(f["p95"] for f in tel if isinstance(f["p95"], (int, float)))
    versions: dict[str, int] = {}
    for d in devices:
        key = d.model_version or "none"
        versions[key] = versions.get(key, 0) + 1
    vtext = ", ".join(f"{v}: {n}" for v, n in sorted(versions.items()))
    worst = f"{p95s[-1]:.1f}" if p95s else "-"
    lines.append(f"fleet: {len(devices)} devices, {online} online, {thr:.1f} inferences/s, "
                 f"worst p95 {worst} ms, {errs} errors; versions {vtext or '-'}")
    return "\n".join(lines)


def _frame(out: TextIO, registry: Registry, group: str | None, shown: int) -> None:
    rows = None
    if out.isatty():
        rows = max(5, shutil.get_terminal_size().lines - 4)
        out.write("\x1b[H\x1b[2J")
    elif shown:
        out.write("\n")
    out.write(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime()) + "\n")
    out.write(render(registry, group=group, max_rows=rows) + "\n")
    out.flush()


def _device_from_json(d: dict[str, Any]) -> Device:
    return Device(d["device_id"], online=bool(d.get("online")), group=d.get("group"), profile=d.get("profile"),
                  agent_version=d.get("agent_version"), model=d.get("model"), accelerator=d.get("accelerator"),
                  signed_updates=d.get("signed_updates"), state_ts=d.get("state_ts"),
                  telemetry=d.get("telemetry"), telemetry_ts=d.get("last_telemetry_ts"), seen_ts=d.get("last_seen"),
                  has_state=True)


def watch_controller(client: Any, group: str | None = None, frames: int | None = None, interval: float = 2.0,
                     out: TextIO = sys.stdout) -> int:
    """The same frames from a controller's registry (``GET /v1/devices``): no broker access needed.

    Raises:
        TransportError / ConfigError: the controller does not answer or refuses.
    """
    shown = 0
    while frames is None or shown < frames:
        if shown:
            time.sleep(interval)
        registry = Registry({d["device_id"]: _device_from_json(d) for d in client.get("/v1/devices")})
        _frame(out, registry, group, shown)
        shown += 1
    return shown


def watch(broker: str, group: str | None = None, frames: int | None = None, interval: float = 2.0,
          out: TextIO = sys.stdout, settle_s: float = 0.4) -> int:
    """Print frames until ``frames`` were shown (or forever); returns the number printed.

    Raises:
        TransportError: the broker cannot be reached.
    """
    registry = Registry()
    with connect(broker) as client:
        client.subscribe(STATE_TOPICS + TELEMETRY_TOPICS)
        drain_into(registry, client, settle_s, max_s=30.0)
        shown = 0
        while frames is None or shown < frames:
            if shown:
                deadline = time.monotonic() + interval
                while (left := deadline - time.monotonic()) > 0:
                    try:
                        registry.ingest(client.messages.get(timeout=left))
                    except queue.Empty:
                        break
            _frame(out, registry, group, shown)
            shown += 1
    return shown
