"""Result sinks: a JSONL file (rotated by size) and an optional MQTT results topic.

Results are operational output, not telemetry: the results topic is QoS 0 and dropped while
offline (use the JSONL file when every result must be kept). Sinks run on the source's thread,
never on the HTTP or inference path, and a failing sink logs instead of raising.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["JsonlSink", "TopicSink", "result_record"]

log = logging.getLogger(__name__)



def result_record(source: str, item: str, outputs: Any, latency_ms: float, model: dict[str, str] | None,
                  ts: float, top1: int | None, confidence: float | None) -> dict[str, Any]:
    """The JSON shape of one result (same in the file and on the topic)."""

    def plain(v: Any) -> Any:
        arr = np.asarray(v)
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            return None
        return arr.tolist()

    out = {k: plain(v) for k, v in outputs.items()} if isinstance(outputs, dict) else plain(outputs)
    return {"ts": round(ts, 3), "source": source, "item": item, "model": model, "latency_ms": round(latency_ms, 3),
            "top1": top1, "confidence": None if confidence is None else round(confidence, 6), "outputs": out}


class JsonlSink:
    """Append one line per result; past ``max_bytes`` the file becomes ``<name>.1`` (one kept)."""

    def __init__(self, path: Path, max_bytes: int = 64 << 20) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the sink

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n"
        with self._lock:
            try:
                if self._fh.tell() + len(line) > self.max_bytes:
                    self._fh.close()
                    os.replace(self.path, self.path.with_name(self.path.name + ".1"))
                    self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
                self._fh.write(line)
                self._fh.flush()
            except (OSError, ValueError) as exc:
                log.warning("results file %s: %s", self.path, exc)

    def close(self) -> None:
        with self._lock:
            self._fh.close()


class TopicSink:
    """Publish each result, QoS 0, through ``publish(topic, payload, qos, retain)``."""

    def __init__(self, topic: str, publish: Callable[..., Any]) -> None:
        self.topic = topic
        self._publish = publish

    def write(self, record: dict[str, Any]) -> None:
        try:
            self._publish(self.topic, json.dumps(record, separators=(",", ":")).encode(), 0, False)
        except Exception as exc:  # noqa: BLE001 - offline or paho refused: results are best effort
            log.debug("results topic publish failed: %s", exc)

    def close(self) -> None:
        pass
