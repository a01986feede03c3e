"""Simulated devices decide about commands as real agents do (the same CommandProcessor) and walk legal OTA steps."""

from __future__ import annotations

import itertools
import json
import time

import pytest

from edgefleet.commands import CommandProcessor
from edgefleet.messages import check_transition
from edgefleet.testing.simulator import OTA_STEPS, Simulator

DEVICE = "sim-00000"


def _cmd(**fields) -> bytes:
    return json.dumps({"ts": time.time(), **fields}).encode()


@pytest.fixture()
def pair(tmp_path):
    """A simulated device (never connected: only its command handling runs) and an agent's processor."""
    sim = Simulator("mqtt://127.0.0.1:1", count=1)
    status = sim.handle_command(DEVICE, "status", _cmd(id="probe"))["result"]
    real = CommandProcessor(DEVICE, {"status": lambda cmd: status, "update": lambda cmd: {"accepted": True}},
                            memory_path=tmp_path / "commands.json")
    return sim, real


@pytest.mark.parametrize("case,requests", [
    ("no ttl_s, sent 1000 s ago: the agent's 86400 s default, not expired",
     [("status", json.dumps({"id": "old", "ts": time.time() - 1000}).encode())]),
    ("a duplicate id: the stored reply again, not a second update",
     [("update", _cmd(id="u1", manifest={"version": "2"}))] * 2),
    ("malformed JSON", [("status", b"{not json")]),
])
def test_a_simulated_device_replies_like_a_real_command_processor(pair, case, requests):
    sim, real = pair
    simulated = [sim.handle_command(DEVICE, name, payload) for name, payload in requests]
    assert simulated == [real.handle(name, payload) for name, payload in requests], case


def test_a_command_past_the_agents_longest_ttl_expires_on_both(pair):
    sim, real = pair
    payload = json.dumps({"id": "ancient", "ts": time.time() - 90_000}).encode()
    replies = [sim.handle_command(DEVICE, "status", payload), real.handle("status", payload)]
    assert [(r["ok"], r["error"].split(":")[0]) for r in replies] == [(False, "expired")] * 2


@pytest.mark.parametrize("outcome", sorted(OTA_STEPS))
def test_simulated_ota_steps_are_legal_moves_of_the_ota_machine(outcome):
    steps = OTA_STEPS[outcome]
    for current, new in itertools.pairwise(steps):
        check_transition(current, new)
    assert steps[-1].terminal
