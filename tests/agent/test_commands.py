"""CommandProcessor decisions: dedup (also across restarts), TTL, rate limit, errors never escape."""

from __future__ import annotations

import json
from pathlib import Path

from edgefleet.commands import CommandProcessor, CommandRejected
from edgefleet.errors import ModelError


class Counter:
    """A real handler that counts its executions (what 'not executed twice' is about)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, cmd: dict) -> dict:
        self.calls += 1
        return {"n": self.calls}


NOW = 1_800_000_000.0


def processor(tmp_path: Path, handler, **kw) -> CommandProcessor:
    return CommandProcessor("pi-1", {"status": handler}, memory_path=tmp_path / "commands.json",
                            clock=lambda: NOW, **kw)


def cmd(cid: str = "c1", ts: float = NOW, **extra) -> bytes:
    return json.dumps({"id": cid, "ts": ts, **extra}).encode()


def test_repeated_id_is_answered_again_but_executed_once_even_after_a_restart(tmp_path: Path) -> None:
    handler = Counter()
    first = processor(tmp_path, handler).handle("status", cmd())
    assert first == {"id": "c1", "ok": True, "device_id": "pi-1", "result": {"n": 1}}
    assert processor(tmp_path, handler).handle("status", cmd()) == first  # a new process, same state_dir
    assert handler.calls == 1


def test_memory_of_ids_is_bounded(tmp_path: Path) -> None:
    handler = Counter()
    proc = processor(tmp_path, handler, remember=3)
    for i in range(5):
        proc.handle("status", cmd(f"c{i}"))
    assert len(json.loads((tmp_path / "commands.json").read_text())) == 3
    proc.handle("status", cmd("c0"))  # forgotten: runs again
    assert handler.calls == 6


def test_expired_command_is_refused_and_not_run(tmp_path: Path) -> None:
    handler = Counter()
    reply = processor(tmp_path, handler).handle("status", cmd(ts=NOW - 100, ttl_s=30))
    assert reply["ok"] is False and reply["error"].startswith("expired")
    assert handler.calls == 0


def test_ttl_is_capped_by_max_ttl(tmp_path: Path) -> None:
    reply = processor(tmp_path, Counter(), max_ttl_s=60).handle("status", cmd(ts=NOW - 120, ttl_s=10_000))
    assert "expired" in reply["error"]


def test_malformed_payloads_get_one_line_errors(tmp_path: Path) -> None:
    proc = processor(tmp_path, Counter())
    for data in (b"{", b"[1]", b"\xff\xfe", json.dumps({"ts": NOW}).encode(), cmd(ts="yesterday")):
        reply = proc.handle("status", data)
        assert reply["ok"] is False and "malformed" in reply["error"] and "\n" not in reply["error"]


def test_unknown_command_names_the_known_ones(tmp_path: Path) -> None:
    reply = processor(tmp_path, Counter()).handle("reboot", cmd())
    assert reply["ok"] is False and "unknown command 'reboot'" in reply["error"] and "status" in reply["error"]


def test_rate_limit_refuses_without_remembering(tmp_path: Path) -> None:
    handler = Counter()
    proc = processor(tmp_path, handler, rate_per_min=0.001, burst=2)
    replies = [proc.handle("status", cmd(f"r{i}")) for i in range(3)]
    assert [r["ok"] for r in replies] == [True, True, False]
    assert "rate limited" in replies[2]["error"]
    assert "r2" not in dict(json.loads((tmp_path / "commands.json").read_text()))


def test_handler_errors_become_replies(tmp_path: Path) -> None:
    def refuse(c: dict) -> dict:
        raise CommandRejected("not available: nope")

    def model_down(c: dict) -> dict:
        raise ModelError("no model is active yet")

    def bug(c: dict) -> dict:
        raise KeyError("x")

    proc = CommandProcessor("pi-1", {"a": refuse, "b": model_down, "c": bug}, clock=lambda: NOW)
    assert proc.handle("a", cmd("1"))["error"] == "not available: nope"
    assert proc.handle("b", cmd("2"))["error"] == "no model is active yet"
    assert proc.handle("c", cmd("3"))["error"].startswith("internal error: KeyError")


def test_unreadable_memory_file_does_not_stop_the_agent(tmp_path: Path) -> None:
    (tmp_path / "commands.json").write_text("{broken")
    assert processor(tmp_path, Counter()).handle("status", cmd())["ok"] is True
