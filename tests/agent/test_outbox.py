"""The store-and-forward outbox: durable, ordered, bounded, seq never repeats."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

from agent.outbox import Outbox


def bodies(box: Outbox) -> list[dict]:
    return [json.loads(r.payload) for r in box.after(0, 10_000)]


def test_rows_come_back_in_order_with_growing_seq_per_stream(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    assert box.append("t/telemetry", {"n": 1}, "telemetry") == 1
    assert box.append("t/events", {"n": 2}, "events") == 1
    assert box.append("t/telemetry", {"n": 3}, "telemetry") == 2
    rows = box.after(0, 10)
    assert [r.topic for r in rows] == ["t/telemetry", "t/events", "t/telemetry"]
    assert [(b["n"], b["seq"]) for b in bodies(box)] == [(1, 1), (2, 1), (3, 2)]
    box.delete([rows[0].id, 999_999])
    assert box.pending() == 2 and [b["n"] for b in bodies(box)] == [2, 3]


def test_seq_and_rows_survive_reopening(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    for i in range(5):
        box.append("t", {"i": i}, "telemetry")
    box.delete([box.after(0, 1)[0].id])
    box.close()
    again = Outbox(tmp_path / "o.sqlite")
    assert again.pending() == 4 and again.last_seq("telemetry") == 5
    assert again.append("t", {"i": 5}, "telemetry") == 6
    assert [b["seq"] for b in bodies(again)] == [2, 3, 4, 5, 6]


def test_full_outbox_drops_oldest_rows_and_counts_them(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite", max_rows=10, max_bytes=10_000_000)
    for i in range(25):
        box.append("t", {"i": i}, "telemetry")
    assert box.pending() == 10 and box.dropped() == 15
    assert [b["i"] for b in bodies(box)] == list(range(15, 25))


def test_byte_bound_is_enforced(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite", max_rows=10_000, max_bytes=5000)
    for i in range(100):
        box.append("t", {"pad": "x" * 200, "i": i}, "telemetry")
    assert box.pending_bytes() <= 5000
    assert box.dropped() == 100 - box.pending()
    assert bodies(box)[-1]["i"] == 99


def _append_then_die(path: str, count: int) -> None:
    box = Outbox(path)
    for i in range(count):
        box.append("t", {"i": i}, "telemetry")
    os._exit(0)  # no close, no checkpoint: what a power cut leaves behind (minus the OS cache)


def test_rows_committed_before_a_hard_exit_are_all_there(tmp_path: Path) -> None:
    path = str(tmp_path / "o.sqlite")
    proc = multiprocessing.get_context("fork").Process(target=_append_then_die, args=(path, 50))
    proc.start()
    proc.join(30)
    box = Outbox(path)
    assert [b["i"] for b in bodies(box)] == list(range(50))
    assert box.append("t", {}, "telemetry") == 51


def test_a_damaged_database_is_set_aside_and_a_fresh_outbox_starts(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    box = Outbox(path)
    assert box.recovered_from is not None and box.recovered_from.read_bytes().startswith(b"this is not")
    assert box.pending() == 0 and box.append("t", {}, "telemetry") == 1
