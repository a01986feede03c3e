"""CommandProcessor decisions: dedup (also across restarts), TTL, rate limit, errors never escape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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


def test_memory_is_bounded_and_a_full_memory_refuses_instead_of_forgetting(tmp_path: Path) -> None:
    handler = Counter()
    proc = processor(tmp_path, handler, remember=3)
    replies = [proc.handle("status", cmd(f"c{i}")) for i in range(5)]
    assert [r["ok"] for r in replies] == [True, True, True, False, False]
    assert replies[3]["error"].startswith("busy")
    assert len(json.loads((tmp_path / "commands.json").read_text())) == 3
    assert proc.handle("status", cmd("c0")) == replies[0]  # still a replay: not run again
    assert handler.calls == 3


def test_ids_are_forgotten_once_their_command_has_expired(tmp_path: Path) -> None:
    clock = [NOW]
    handler = Counter()
    proc = CommandProcessor("pi-1", {"status": handler}, remember=2, clock=lambda: clock[0])
    proc.handle("status", cmd("old", ttl_s=10))
    clock[0] = NOW + 11
    assert proc.handle("status", cmd("old", ttl_s=10))["error"].startswith("expired")  # judged afresh
    assert proc.handle("status", cmd("a", ts=clock[0]))["ok"] and proc.handle("status", cmd("b", ts=clock[0]))["ok"]
    assert handler.calls == 3


def test_flood_of_refused_commands_does_not_flush_the_replay_memory(tmp_path: Path) -> None:
    handler = Counter()
    proc = processor(tmp_path, handler, remember=4)
    first = proc.handle("status", cmd("update-1"))
    for i in range(1000):  # expired, unknown, malformed: none of them is remembered
        proc.handle("status", cmd(f"x{i}", ts=NOW - 10_000, ttl_s=1))
        proc.handle("reboot", cmd(f"y{i}"))
        proc.handle("status", cmd(f"z{i}", ttl_s=-1))
    assert proc.handle("status", cmd("update-1")) == first
    assert handler.calls == 1


@pytest.mark.parametrize("ts, ttl", [
    ("NaN", 30), ("Infinity", 30), ("-Infinity", 30), (NOW, "NaN"), (NOW, "Infinity"),
])
def test_nan_or_infinite_ts_or_ttl_is_refused(tmp_path: Path, ts, ttl) -> None:
    handler = Counter()
    body = f'{{"id": "n1", "ts": {ts}, "ttl_s": {ttl}}}'.encode()
    reply = processor(tmp_path, handler).handle("status", body)
    assert reply["ok"] is False and "\n" not in reply["error"]
    assert handler.calls == 0


def test_far_future_ts_is_refused(tmp_path: Path) -> None:
    handler = Counter()
    proc = processor(tmp_path, handler)
    reply = proc.handle("status", cmd("f1", ts=NOW + 10 * 365 * 86_400, ttl_s=1))
    assert reply["ok"] is False and "in the future" in reply["error"]
    assert proc.handle("status", cmd("f2", ts=NOW + 60))["ok"]  # a little clock skew is fine
    assert handler.calls == 1


def test_memory_written_by_the_previous_release_still_prevents_a_replay(tmp_path: Path) -> None:
    reply = {"id": "c1", "ok": True, "device_id": "pi-1", "result": {"n": 1}}
    (tmp_path / "commands.json").write_text(json.dumps([["c1", reply]]))
    handler = Counter()
    assert processor(tmp_path, handler).handle("status", cmd()) == reply
    assert handler.calls == 0


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
    assert "r2" not in {entry[0] for entry in json.loads((tmp_path / "commands.json").read_text())}


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


def test_a_command_newer_than_this_agent_is_refused_with_the_upgrade_hint(tmp_path: Path) -> None:
    handler = Counter()
    proc = processor(tmp_path, handler)
    reply = proc.handle("status", cmd("s9", schema=99))
    assert reply["ok"] is False and "upgrade edge-agent" in reply["error"]
    assert proc.handle("status", cmd("s0", schema="2"))["error"].startswith("malformed command")
    assert proc.handle("status", cmd("s2", schema=2))["ok"] and handler.calls == 1
