"""The OTA state machine as data, and what boot does with interrupted work: pure, no files, no device."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from agent.engine import StuckCalls
from agent.ota import OtaManager
from agent.ota.commands import RollbackRequest, UpdateRequest, admit_update, refuse_busy, rollback_target
from agent.ota.hang import hung_reason
from agent.ota.recovery import BootAction, journal_from_slots, plan_boot, serving_order
from agent.ota.slots import JOURNAL_NAME, Journal, Outcome, Pending, SlotStore
from edgefleet.errors import ConfigError
from edgefleet.messages import OtaState
from edgefleet.profiles import load_profile

S = OtaState
COMMITTED = Journal(active="clf-v2-bbbb", history=("clf-v1-aaaa",),
                    versions={"clf-v2-bbbb": "2", "clf-v1-aaaa": "1"})
# Stands for the command kept in staging; plan_boot only passes it on.
COMMAND = UpdateRequest("r3", None, {}, None, "http://x/model.tflite")  # type: ignore[arg-type]


def in_flight(state: OtaState, kind: str = "update", slot: str | None = None) -> Journal:
    return COMMITTED.with_pending(Pending(kind, "r3", "3", state, slot=slot, from_slot=COMMITTED.active))


# ---------------------------------------------------------------- the order guard
def test_a_step_out_of_order_is_refused():
    with pytest.raises(RuntimeError, match="illegal OtaState transition queued -> probation"):
        in_flight(S.QUEUED).step(S.PROBATION)
    with pytest.raises(RuntimeError, match="illegal"):
        in_flight(S.DOWNLOADING).step(S.INSTALLING, slot="clf-v3-cccc")


def test_the_normal_order_is_accepted_and_persisted_as_strings():
    j = in_flight(S.QUEUED)
    for state in (S.DOWNLOADING, S.VERIFYING, S.VALIDATING, S.INSTALLING, S.PROBATION):
        j = j.step(state)
    assert j.to_json()["pending"]["state"] == "probation"
    assert type(j.to_json()["pending"]["state"]) is str
    done = j.committed("clf-v3-cccc", "3", 3, Outcome("r3", "3", S.COMMITTED))
    assert done.active == "clf-v3-cccc" and done.outcome.state is S.COMMITTED


def test_committing_an_update_that_never_served_is_refused():
    with pytest.raises(RuntimeError, match="verifying -> committed"):
        in_flight(S.VERIFYING).committed("clf-v3-cccc", "3", 3, Outcome("r3", "3", S.COMMITTED))


def test_rolling_back_an_update_that_never_served_is_refused():
    with pytest.raises(RuntimeError, match="queued -> rolled_back"):
        in_flight(S.QUEUED).finished(Outcome("r3", "3", S.ROLLED_BACK))


def test_a_rejection_before_anything_was_queued_needs_no_pending_state():
    j = COMMITTED.finished(Outcome("r9", "9", S.REJECTED, "not signed"))
    assert j.pending is None and j.outcome.state is S.REJECTED


def test_a_resumed_update_may_restart_downloading_but_never_skip_verification():
    assert in_flight(S.VALIDATING).step(S.DOWNLOADING).pending.state is S.DOWNLOADING
    with pytest.raises(RuntimeError, match="downloading -> installing"):
        in_flight(S.DOWNLOADING).step(S.INSTALLING)


# ---------------------------------------------------------------- damaged journals
def _write_journal(root: Path, pending_state: str) -> None:
    data = in_flight(S.DOWNLOADING).to_json()
    data["pending"]["state"] = pending_state
    (root / JOURNAL_NAME).write_text(json.dumps(data))


@pytest.mark.parametrize("state", ["exploded", "COMMITTED", "committed"])
def test_journal_with_an_unknown_or_final_pending_state_is_unreadable(tmp_path: Path, state: str):
    store = SlotStore(tmp_path)
    _write_journal(store.root, state)
    with pytest.raises(ConfigError, match="unreadable OTA journal"):
        store.read_journal()


def test_journal_with_an_unknown_outcome_state_is_unreadable(tmp_path: Path):
    store = SlotStore(tmp_path)
    data = COMMITTED.finished(Outcome("r2", "2", S.COMMITTED)).to_json()
    data["outcome"]["state"] = "sort_of_committed"
    store.journal_path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="unreadable OTA journal"):
        store.read_journal()


def test_damaged_journal_with_no_slot_left_boots_with_nothing_served_and_says_so(tmp_path: Path):
    # Never a silent fresh start: the damaged file is set aside and the device reports it.
    events: list[dict] = []
    ota = OtaManager(tmp_path, load_profile("x86-dev"), [], SimpleNamespace(model_info=None), events.append)
    _write_journal(ota.store.root, "exploded")
    try:
        assert ota.boot() is None
        assert "unreadable OTA journal" in ota.status()["boot_error"] and "no slot verifies" in ota.status()["boot_error"]
        assert events[0]["event"] == "model_error" and "set aside" in events[0]["reason"]
        assert (ota.store.root / "journal.json.damaged").exists()
    finally:
        ota.close()


def test_journal_rebuilt_from_slots_serves_the_highest_version_and_keeps_it_as_the_floor():
    j = journal_from_slots({"clf-v1-aaaa": "1", "clf-v3-cccc": "3", "clf-v2-bbbb": "2"}, keep=2)
    assert j.active == "clf-v3-cccc" and j.history == ("clf-v2-bbbb",) and j.floor == "3"
    assert journal_from_slots({}, keep=3) == Journal()


# ---------------------------------------------------------------- plan_boot, per pending state
def test_nothing_in_flight_keeps_the_committed_slots_and_no_staging():
    plan = plan_boot(COMMITTED, None)
    assert plan.action is BootAction.NOTHING and plan.outcome is None
    assert plan.keep_slots == {"clf-v2-bbbb", "clf-v1-aaaa"} and plan.keep_staging == frozenset()


@pytest.mark.parametrize("state", [S.QUEUED, S.DOWNLOADING, S.VERIFYING, S.VALIDATING])
def test_update_interrupted_before_installing_is_resumed(state: OtaState):
    plan = plan_boot(in_flight(state), COMMAND)
    assert plan.action is BootAction.RESUME_UPDATE and plan.request is COMMAND and plan.outcome is None
    assert plan.keep_staging == {"r3"}, "the staged command and .part file are what it resumes from"
    assert plan.keep_slots == COMMITTED.kept
    assert (plan.journal.pending.boots, plan.journal.pending.boot_state) == (1, state), "this boot is counted"


def _boot_again(journal: Journal, state: OtaState) -> Journal:
    """What the resumed run leaves in the journal when it dies in ``state`` again."""
    p = journal.pending
    return journal.with_pending(Pending(p.kind, p.rollout_id, p.version, state, slot=p.slot, from_slot=p.from_slot,
                                        boots=p.boots, boot_state=p.boot_state))


def test_update_that_crashes_the_agent_three_times_in_validating_is_rejected_not_resumed_again():
    j = in_flight(S.VALIDATING)
    for _ in range(2):
        plan = plan_boot(j, COMMAND)
        assert plan.action is BootAction.RESUME_UPDATE
        j = _boot_again(plan.journal, S.VALIDATING)
    plan = plan_boot(j, COMMAND)
    assert plan.action is BootAction.REJECT and plan.outcome is S.REJECTED
    assert plan.reason == "crashed the agent 3 times in validating; not resuming it again"


def test_crashes_in_different_states_are_progress_and_do_not_add_up():
    plan = plan_boot(in_flight(S.DOWNLOADING), COMMAND)
    plan = plan_boot(_boot_again(plan.journal, S.VALIDATING), COMMAND)
    plan = plan_boot(_boot_again(plan.journal, S.DOWNLOADING), COMMAND)
    assert plan.action is BootAction.RESUME_UPDATE and plan.journal.pending.boots == 1


def test_rollback_that_crashes_the_agent_every_boot_is_given_up_as_failed():
    j = in_flight(S.INSTALLING, kind="rollback", slot="clf-v1-aaaa")
    for _ in range(2):
        j = plan_boot(j, None).journal
    plan = plan_boot(j, None)
    assert plan.action is BootAction.GIVE_UP_ROLLBACK and plan.outcome is S.FAILED
    assert "crashed the agent 3 times in installing" in plan.reason


@pytest.mark.parametrize("state", [S.QUEUED, S.DOWNLOADING, S.VERIFYING, S.VALIDATING])
def test_update_whose_command_was_lost_is_rejected(state: OtaState):
    plan = plan_boot(in_flight(state), None)
    assert plan.action is BootAction.REJECT and plan.outcome is S.REJECTED
    assert "command was lost" in plan.reason and plan.keep_staging == frozenset()


@pytest.mark.parametrize("state", [S.INSTALLING, S.PROBATION])
def test_update_interrupted_while_installing_or_in_probation_is_rolled_back(state: OtaState):
    plan = plan_boot(in_flight(state, slot="clf-v3-cccc"), COMMAND)
    assert plan.action is BootAction.ROLL_BACK and plan.outcome is S.ROLLED_BACK and plan.request is None
    assert plan.reason == f"agent restarted during {state.value}; kept the committed version 2"
    assert "clf-v3-cccc" not in plan.keep_slots, "the new slot is a leftover once rolled back"
    assert plan.keep_staging == frozenset()


def test_interrupted_rollback_command_is_finished_and_its_target_kept():
    plan = plan_boot(in_flight(S.INSTALLING, kind="rollback", slot="clf-v1-aaaa"), None)
    assert plan.action is BootAction.FINISH_ROLLBACK and plan.outcome is None
    assert "clf-v1-aaaa" in plan.keep_slots


def test_the_boot_plan_of_every_non_final_state_is_defined():
    for state in S:
        if not state.terminal:
            assert plan_boot(in_flight(state), COMMAND).action is not BootAction.NOTHING


def test_a_damaged_active_slot_falls_back_to_the_most_recent_kept_one():
    assert serving_order(COMMITTED) == ("clf-v2-bbbb", "clf-v1-aaaa")


def test_the_floor_rises_with_updates_and_never_falls_with_rollbacks():
    j = COMMITTED.with_pending(Pending("update", "r3", "3", S.PROBATION, slot="clf-v3-cccc"))
    j = j.committed("clf-v3-cccc", "3", 3, Outcome("r3", "3", S.COMMITTED))
    assert j.floor == "3"
    j = j.with_pending(Pending("rollback", "rb", "1", S.INSTALLING, slot="clf-v1-aaaa"))
    j = j.committed("clf-v1-aaaa", "1", 3, Outcome("rb", "1", S.COMMITTED, rollback=True))
    assert j.active == "clf-v1-aaaa" and j.floor == "3"
    assert Journal.from_json(j.to_json()) == j


def test_a_journal_written_before_the_floor_existed_takes_its_highest_kept_version():
    data = COMMITTED.to_json()
    del data["floor"]
    assert Journal.from_json(data).floor == "2"


# ---------------------------------------------------------------- admitting commands
def request(rollout_id: str, version: str) -> UpdateRequest:
    # admit_update reads only the rollout id and the manifest's version.
    return UpdateRequest(rollout_id, SimpleNamespace(version=version), {}, None, "http://x")  # type: ignore[arg-type]


def test_redelivered_update_in_flight_gets_its_state_not_a_second_run():
    j = in_flight(S.VERIFYING)
    assert admit_update(j, request("r3", "3")) == {"accepted": True, "state": "verifying", "duplicate": True}
    other = request("r4", "4")
    with pytest.raises(ConfigError, match="busy: update r3"):
        admit_update(j, other)
    assert admit_update(COMMITTED, other) is None


def test_rollback_while_an_update_is_in_flight_is_busy():
    with pytest.raises(ConfigError, match="busy"):
        refuse_busy(in_flight(S.PROBATION))
    refuse_busy(COMMITTED)


def test_rollback_target_is_a_kept_version_or_the_reason_why_not():
    assert rollback_target(COMMITTED, RollbackRequest("rb", None)) == ("clf-v1-aaaa", "1")
    assert rollback_target(COMMITTED, RollbackRequest("rb", "1.0")) == ("clf-v1-aaaa", "1")
    with pytest.raises(ConfigError, match=r"version 7 is not kept on this device \(kept: 1\)"):
        rollback_target(COMMITTED, RollbackRequest("rb", "7"))
    with pytest.raises(ConfigError, match="no previous version"):
        rollback_target(Journal(active="clf-v1-aaaa", versions={"clf-v1-aaaa": "1"}), RollbackRequest("rb", None))


# ---------------------------------------------------------------- a committed model that later hangs
def _stuck(oldest_s: float, deadline_s: float = 0.5, count: int = 1) -> StuckCalls:
    return StuckCalls(count, oldest_s, deadline_s)


AFTER_UPDATE = replace(COMMITTED, outcome=Outcome("r2", "2", S.COMMITTED, reported=True), floor="2")


def test_committed_model_stuck_past_the_limit_is_given_up_for_the_previous_kept_slot():
    j = replace(AFTER_UPDATE, active="clf-v2-bbbbbbbbbbbb", versions={"clf-v2-bbbbbbbbbbbb": "2", "clf-v1-aaaa": "1"})
    sha = "b" * 64
    assert hung_reason(j, _stuck(1.4), sha, 3.0) is None, "not yet 3 deadlines"
    reason = hung_reason(j, _stuck(1.6), sha, 3.0)
    assert reason is not None and "version 2 hung after its commit" in reason and "version 1" in reason
    assert hung_reason(j, _stuck(9.0), "c" * 64, 3.0) is None, "another model serves (a boot fallback)"
    assert hung_reason(replace(j, history=()), _stuck(9.0), sha, 3.0) is None, "nothing to return to"
    rolled = replace(j, outcome=Outcome("rb", "2", S.COMMITTED, rollback=True))
    assert hung_reason(rolled, _stuck(9.0), sha, 3.0) is None, "the operator chose this model"
    demoted = j.demoted(replace(j.outcome, state=S.ROLLED_BACK, reason=reason, reported=False, hung=True))
    assert demoted.active == "clf-v1-aaaa" and demoted.history == () and demoted.floor == "2"
    assert "clf-v2-bbbbbbbbbbbb" not in demoted.kept and "clf-v2-bbbbbbbbbbbb" not in demoted.versions
    assert Journal.from_json(json.loads(json.dumps(demoted.to_json()))) == demoted
    assert hung_reason(demoted, _stuck(9.0), "a" * 64, 3.0) is None, "never walks further down the history"
    assert serving_order(demoted) == ("clf-v1-aaaa",)
