"""``edge-fleet watch``: a live table of the fleet from retained states and telemetry.

Per device: online, model, throughput, p95 latency, cache hit rate, errors, drift, last seen;
then fleet totals. Rendering is O(devices) per frame and ingesting is O(1) per message, so a
busy fleet costs one pass per frame, not per message. ``--frames N`` shows N frames and exits.

Three ways to show a frame (:func:`_screen` picks one):

* a terminal: a rich live table redrawn in place (``screen=False``: the scrollback is never
  cleared, and the last frame stays when watch ends), cut to the terminal's width and height;
  rich is only imported here, so no other command needs it;
* ``--json``: one JSON object per frame and line;
* anything else (a pipe, a file): plain text frames separated by a blank line, no escape codes.
"""

from __future__ import annotations

import json
import queue
import sys
import time
from typing import Any, Protocol, TextIO

from edgefleet.mqtt import BrokerAccess, connect
from fleet.registry import STATE_TOPICS, TELEMETRY_TOPICS, Device, Registry, drain_into

__all__ = ["fleet_totals", "frame_json", "render", "telemetry_fields", "watch", "watch_controller"]

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


def _selected(registry: Registry, group: str | None) -> list[Device]:
    return [d for d in registry.known() if group is None or d.group == group]


def fleet_totals(devices: list[Device]) -> dict[str, Any]:
    """The fleet line's numbers: devices, online, inferences/s, worst p95 (ms), errors, versions."""
    tel = [telemetry_fields(d.telemetry) for d in devices if d.telemetry]
    p95s = [f["p95"] for f in tel if isinstance(f["p95"], (int, float))]
    versions: dict[str, int] = {}
    for d in devices:
        key = d.model_version or "none"
        versions[key] = versions.get(key, 0) + 1
    return {"devices": len(devices), "online": sum(1 for d in devices if d.online),
            "throughput": sum(f["throughput"] or 0 for f in tel), "worst_p95": max(p95s) if p95s else None,
            "errors": sum(f["errors"] or 0 for f in tel), "versions": dict(sorted(versions.items()))}


def _fleet_line(t: dict[str, Any]) -> str:
    vtext = ", ".join(f"{v}: {n}" for v, n in t["versions"].items())
    worst = f"{t['worst_p95']:.1f}" if t["worst_p95"] is not None else "-"
    return (f"fleet: {t['devices']} devices, {t['online']} online, {t['throughput']:.1f} inferences/s, "
            f"worst p95 {worst} ms, {t['errors']} errors; versions {vtext or '-'}")


def render(registry: Registry, now: float | None = None, group: str | None = None,
           max_rows: int | None = None) -> str:
    """One frame of the table as plain text."""
    now = time.time() if now is None else now
    devices = _selected(registry, group)
    rows = [_row(d, now) for d in devices]
    shown = rows if max_rows is None else rows[:max_rows]
    widths = [max([len(h)] + [len(r[i]) for r in shown]) for i, h in enumerate(_HEADER)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(_HEADER, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in shown]
    if len(shown) < len(rows):
        lines.append(f"... {len(rows) - len(shown)} more devices")
    lines.append(_fleet_line(fleet_totals(devices)))
    return "\n".join(lines)


def frame_json(registry: Registry, now: float | None = None, group: str | None = None) -> dict[str, Any]:
    """One frame as the JSON edge sees it: every device's numbers and the fleet totals."""
    now = time.time() if now is None else now
    devices = _selected(registry, group)
    return {"ts": now, "group": group,
            "devices": [{"device_id": d.device_id, "online": d.online, "group": d.group, "model": d.model,
                         "last_seen": d.seen_ts, **telemetry_fields(d.telemetry)} for d in devices],
            "fleet": fleet_totals(devices)}


class _Screen(Protocol):
    def show(self, registry: Registry) -> None: ...

    def close(self) -> None: ...


class _PlainScreen:
    """Frames as text, a blank line between them: for pipes, files and tests."""

    def __init__(self, out: TextIO, group: str | None) -> None:
        self.out, self.group, self.shown = out, group, 0

    def show(self, registry: Registry) -> None:
        if self.shown:
            self.out.write("\n")
        self.out.write(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime()) + "\n")
        self.out.write(render(registry, group=self.group) + "\n")
        self.out.flush()
        self.shown += 1

    def close(self) -> None:
        pass


class _JsonScreen:
    """``--json``: one object per frame and line (JSON Lines)."""

    def __init__(self, out: TextIO, group: str | None) -> None:
        self.out, self.group = out, group

    def show(self, registry: Registry) -> None:
        self.out.write(json.dumps(frame_json(registry, group=self.group)) + "\n")
        self.out.flush()

    def close(self) -> None:
        pass


class _LiveScreen:
    """A rich table redrawn in place on a terminal.

    ``screen=False``: no alternate screen and nothing cleared, so the scrollback above stays and
    the last frame remains when watch ends. Cells never wrap: a cell too wide for the terminal is
    cut with an ellipsis, and rows beyond the terminal's height become a "... N more" line.
    """

    def __init__(self, out: TextIO, group: str | None) -> None:
        from rich.console import Console
        from rich.live import Live

        self.group = group
        self.console = Console(file=out)
        self.live = Live(console=self.console, screen=False, transient=False, auto_refresh=False,
                         redirect_stdout=False, redirect_stderr=False, vertical_overflow="crop")
        self.live.start()

    def _table(self, registry: Registry) -> Any:
        from rich.table import Table

        now = time.time()
        devices = _selected(registry, self.group)
        room = max(1, self.console.size.height - 7)  # title, header, rules, "more" and fleet lines
        table = Table(title=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)), title_justify="left",
                      caption=_fleet_line(fleet_totals(devices)), caption_justify="left", box=None,
                      header_style="bold", pad_edge=False)
        for i, name in enumerate(_HEADER):
            table.add_column(name, no_wrap=True, overflow="ellipsis", justify="right" if i >= 4 else "left",
                             min_width=min(len(name), 6))
        for d in devices[:room]:
            table.add_row(*_row(d, now))
        if len(devices) > room:
            table.add_row(f"... {len(devices) - room} more devices")
        return table

    def show(self, registry: Registry) -> None:
        self.live.update(self._table(registry), refresh=True)

    def close(self) -> None:
        self.live.stop()


def _screen(out: TextIO, group: str | None, as_json: bool) -> _Screen:
    if as_json:
        return _JsonScreen(out, group)
    if out.isatty():
        try:
            return _LiveScreen(out, group)
        except ImportError:
            sys.stderr.write("watch: rich is not installed (pip install 'edgefleet[fleet]'): plain frames\n")
    return _PlainScreen(out, group)


def _device_from_json(d: dict[str, Any]) -> Device:
    return Device(d["device_id"], online=bool(d.get("online")), group=d.get("group"), profile=d.get("profile"),
                  agent_version=d.get("agent_version"), model=d.get("model"), accelerator=d.get("accelerator"),
                  signed_updates=d.get("signed_updates"), state_ts=d.get("state_ts"),
                  telemetry=d.get("telemetry"), telemetry_ts=d.get("last_telemetry_ts"), seen_ts=d.get("last_seen"),
                  has_state=True)


def watch_controller(client: Any, group: str | None = None, frames: int | None = None, interval: float = 2.0,
                     out: TextIO = sys.stdout, as_json: bool = False) -> int:
    """The same frames from a controller's registry (``GET /v1/devices``): no broker access needed.

    Raises:
        TransportError / ConfigError: the controller does not answer or refuses.
    """
    shown = 0
    screen = None
    try:
        while frames is None or shown < frames:
            if shown:
                time.sleep(interval)
            registry = Registry({d["device_id"]: _device_from_json(d) for d in client.get("/v1/devices")})
            screen = screen or _screen(out, group, as_json)
            screen.show(registry)
            shown += 1
    finally:
        if screen is not None:
            screen.close()
    return shown


def watch(broker: str | BrokerAccess, group: str | None = None, frames: int | None = None, interval: float = 2.0,
          out: TextIO = sys.stdout, settle_s: float = 0.4, as_json: bool = False) -> int:
    """Show frames until ``frames`` were shown (or forever); returns the number shown.

    Raises:
        TransportError: the broker cannot be reached.
    """
    registry = Registry()
    with connect(broker) as client:
        client.subscribe(STATE_TOPICS + TELEMETRY_TOPICS)
        drain_into(registry, client, settle_s, max_s=30.0)
        shown = 0
        screen = _screen(out, group, as_json)
        try:
            while frames is None or shown < frames:
                if shown:
                    deadline = time.monotonic() + interval
                    while (left := deadline - time.monotonic()) > 0:
                        try:
                            registry.ingest(client.messages.get(timeout=left))
                        except queue.Empty:
                            break
                screen.show(registry)
                shown += 1
        finally:
            screen.close()
    return shown
