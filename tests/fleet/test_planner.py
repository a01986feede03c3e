"""The rollout planner and the store as pure logic: waves, thresholds, timeouts, abort, resume."""

from __future__ import annotations

from dataclasses import replace

import pytest

from edgefleet.errors import ConfigError
from edgefleet.messages import ExecState
from fleet import rollout
from fleet.rollout import Policy, apply_event, apply_reply, decide, parse_canary, plan_waves, unanswered
from fleet.store import Execution, Rollout, Store

T0 = 1_000_000.0


def _rollout(n_waves: int, state: str = "IN_PROGRESS", wave: int = 0) -> Rollout:
    return Rollout(id="r1", kind="deploy", created=T0, updated=T0, state=state, policy={}, current_wave=wave,
                   waves=n_waves, version="2", sha256="ab" * 32)


def _execs(waves: list[list[str]]) -> list[Execution]:
    return [Execution("r1", d, w, prev_version="1") for w, ids in enumerate(waves) for d in ids]


def _set(execs: list[Execution], ids: list[str], **changes) -> list[Execution]:
    return [replace(e, **changes) if e.device_id in ids else e for e in execs]


def _sent(execs, ids, at=T0):
    return [replace(e, state=ExecState.SENT, command_id=f"c-{e.device_id}", sent_ts=at) if e.device_id in ids else e
            for e in execs]


def test_waves_start_with_the_canary_and_grow_by_the_factor():
    ids = [f"d{i}" for i in range(20)]
    waves = plan_waves(ids, canary=2, wave_base=3, wave_factor=2)
    assert [len(w) for w in waves] == [2, 3, 6, 9]
    assert [d for w in waves for d in w] == ids


def test_no_canary_means_the_first_wave_is_the_base():
    assert [len(w) for w in plan_waves(list("abcdefg"), 0, 2, 1.5)] == [2, 3, 2]


@pytest.mark.parametrize("text,total,expected", [("3", 10, 3), ("10%", 50, 5), ("1%", 10, 1), ("0", 5, 0),
                                                  ("200", 5, 5), ("100%", 7, 7)])
def test_canary_accepts_counts_and_shares(text, total, expected):
    assert parse_canary(text, total) == expected


@pytest.mark.parametrize("bad", ["-1", "x", "150%", ""])
def test_canary_rejects_nonsense(bad):
    with pytest.raises(ConfigError):
        parse_canary(bad, 10)


def test_policy_rejects_impossible_thresholds():
    with pytest.raises(ConfigError):
        Policy(max_failure_pct=120)
    with pytest.raises(ConfigError):
        Policy(wave_factor=0.5)


def test_first_decision_sends_only_the_canary():
    execs = _execs([["a"], ["b", "c"]])
    d = decide(_rollout(2), execs, Policy(canary=1), T0)
    assert d.send_update == ("a",) and d.state == "IN_PROGRESS" and d.current_wave == 0


def test_next_wave_starts_only_when_the_canary_has_finished():
    execs = _sent(_execs([["a"], ["b", "c"]]), ["a"])
    assert decide(_rollout(2), execs, Policy(canary=1), T0 + 1).send_update == ()
    execs = _set(execs, ["a"], state="SUCCEEDED", ota_state="committed")
    d = decide(_rollout(2), execs, Policy(canary=1), T0 + 1)
    assert d.current_wave == 1 and d.send_update == ("b", "c")


def test_any_canary_failure_aborts_and_cancels_the_unsent_waves():
    execs = _sent(_execs([["a", "b"], ["c", "d"]]), ["a", "b"])
    execs = _set(execs, ["a"], state="SUCCEEDED", ota_state="committed")
    execs = _set(execs, ["b"], state="REJECTED", ota_state="rejected", reason="golden")
    d = decide(_rollout(2), execs, Policy(canary=2, min_executed=10), T0 + 1)
    assert d.state == "ABORTING" and "canary" in d.reason
    assert {e.device_id: e.state for e in d.changed} == {"c": "CANCELED", "d": "CANCELED"}
    assert d.send_rollback == ("a",), "the canary device that committed goes back"


def test_abort_waits_for_in_flight_devices_and_rolls_back_late_commits():
    pol = Policy(canary=0, wave_base=4, min_executed=2, max_failure_pct=25)
    execs = _sent(_execs([["a", "b", "c", "d"]]), ["a", "b", "c", "d"])
    execs = _set(execs, ["a", "b"], state="FAILED", ota_state="failed")
    d = decide(_rollout(1), execs, pol, T0 + 1)
    assert d.state == "ABORTING" and "above --max-failure-pct 25" in d.reason
    aborting = replace(_rollout(1), state="ABORTING", reason=d.reason)
    assert decide(aborting, execs, pol, T0 + 2).state == "ABORTING"  # c, d still running
    execs = _set(execs, ["c"], state="SUCCEEDED", ota_state="committed")
    execs = _set(execs, ["d"], state="REJECTED", ota_state="rejected")
    d = decide(aborting, execs, pol, T0 + 3)
    assert d.send_rollback == ("c",) and d.state == "ABORTING"
    execs = _set(execs, ["c"], rollback_state="SUCCEEDED")
    assert decide(aborting, execs, pol, T0 + 4).state == "ABORTED"


def test_no_rollback_on_abort_leaves_updated_devices_alone():
    pol = Policy(canary=1, rollback_on_abort=False)
    execs = _sent(_execs([["a"], ["b"]]), ["a"])
    execs = _set(execs, ["a"], state="REJECTED", ota_state="rejected")
    d = decide(_rollout(2), execs, pol, T0 + 1)
    assert d.send_rollback == () and d.state == "ABORTED"


def test_failures_below_the_minimum_executed_do_not_abort():
    pol = Policy(canary=0, wave_base=10, min_executed=5, max_failure_pct=10)
    execs = _sent(_execs([[f"d{i}" for i in range(10)]]), [f"d{i}" for i in range(10)])
    execs = _set(execs, ["d0"], state="FAILED")
    execs = _set(execs, ["d1", "d2"], state="SUCCEEDED", ota_state="committed")
    assert decide(_rollout(1), execs, pol, T0 + 1).state == "IN_PROGRESS"
    execs = _set(execs, ["d3", "d4"], state="SUCCEEDED", ota_state="committed")
    assert decide(_rollout(1), execs, pol, T0 + 1).state == "ABORTING"  # 1 of 5 = 20% > 10%


def test_silent_devices_time_out_and_count_as_failures():
    pol = Policy(canary=1, device_timeout_s=30)
    execs = _sent(_execs([["a"], ["b"]]), ["a"])
    assert decide(_rollout(2), execs, pol, T0 + 29).state == "IN_PROGRESS"
    d = decide(_rollout(2), execs, pol, T0 + 31)
    assert [(e.device_id, e.state) for e in d.changed if e.device_id == "a"] == [("a", "TIMED_OUT")]
    assert d.state in ("ABORTING", "ABORTED")


def test_all_waves_done_within_threshold_is_succeeded_otherwise_failed():
    pol = Policy(canary=0, wave_base=10, min_executed=100, max_failure_pct=10)
    ids = [f"d{i}" for i in range(10)]
    execs = _set(_sent(_execs([ids]), ids), ids, state="SUCCEEDED", ota_state="committed")
    assert decide(_rollout(1), _set(execs, ["d0"], state="FAILED"), pol, T0).state == "SUCCEEDED"
    assert decide(_rollout(1), _set(execs, ["d0", "d1"], state="FAILED"), pol, T0).state == "FAILED"


def test_devices_already_on_the_version_skip_their_wave():
    execs = _execs([["a"], ["b"], ["c"]])
    execs = _set(execs, ["a", "b"], state="SUCCEEDED", reason="already running this version")
    d = decide(_rollout(3), execs, Policy(canary=1), T0)
    assert d.current_wave == 2 and d.send_update == ("c",)


def test_events_map_to_aws_style_execution_states():
    e = Execution("r1", "a", 0, state=ExecState.SENT, command_id="c", sent_ts=T0)
    e1 = apply_event(e, {"event": "ota", "state": "downloading"}, T0 + 1)
    assert e1.state == "IN_PROGRESS"
    assert apply_event(e1, {"state": "committed"}, T0 + 2).state == "SUCCEEDED"
    assert apply_event(e1, {"state": "rejected", "reason": "sig"}, T0 + 2).state == "REJECTED"
    rb = apply_event(e1, {"state": "rolled_back", "reason": "NaN"}, T0 + 2)
    assert rb.state == "FAILED" and "NaN" in rb.reason
    timed_out = replace(e1, state="TIMED_OUT")
    assert apply_event(timed_out, {"state": "committed"}, T0 + 3).ota_state == "committed", \
        "a late commit is remembered so an abort rolls that device back"


def test_a_refused_command_is_a_rejection_with_the_devices_reason():
    e = Execution("r1", "a", 0, state=ExecState.SENT, command_id="c", sent_ts=T0)
    r = apply_reply(e, {"id": "c", "ok": False, "error": "signature required"}, "update", T0 + 1)
    assert r.state == "REJECTED" and "signature required" in r.reason
    assert apply_reply(e, {"id": "c", "ok": True}, "update", T0 + 1).state == "IN_PROGRESS"


def test_an_operator_rollback_counts_only_rollback_events_and_fails_any_way_back():
    e = Execution("r1", "a", 0, state=ExecState.SENT, command_id="c", sent_ts=T0)
    assert apply_event(e, {"state": "committed"}, T0 + 1, kind="rollback") is None, "not a rollback event"
    going = apply_event(e, {"state": "installing", "rollback": True}, T0 + 1, kind="rollback")
    assert going.state == "IN_PROGRESS" and going.ota_state == "installing"
    done = apply_event(going, {"state": "committed", "rollback": True, "version": "1"}, T0 + 2, kind="rollback")
    assert done.state == "SUCCEEDED" and done.reason == "now on 1"
    refused = apply_event(going, {"state": "rejected", "rollback": True}, T0 + 2, kind="rollback")
    assert refused.state == "FAILED" and refused.reason == "rejected"
    reply = apply_reply(e, {"ok": False, "error": "no kept version 0.5"}, "rollback", T0 + 1, kind="rollback")
    assert reply.state == "REJECTED" and "no kept version 0.5" in reply.reason


def test_a_deploys_rollback_answers_fold_into_the_rollback_state_only():
    e = rollout.mark_sent(Execution("r1", "a", 0, state=ExecState.SUCCEEDED, ota_state="committed"), "rb", T0,
                  rollback=True)
    assert (e.state, e.rollback_state, e.rollback_id) == ("SUCCEEDED", "IN_PROGRESS", "rb")
    assert apply_event(e, {"state": "committed", "rollback": True}, T0 + 1).rollback_state == "SUCCEEDED"
    refused = apply_reply(e, {"ok": False, "error": "busy"}, "rollback", T0 + 1)
    assert refused.state == "SUCCEEDED" and refused.rollback_state == "FAILED" and "busy" in refused.reason


def test_answers_for_a_device_never_sent_anything_change_nothing():
    e = Execution("r1", "a", 1)
    target = _rollout(2)
    assert apply_event(e, {"state": "downloading"}, T0) is None
    assert apply_reply(e, {"ok": True}, "update", T0) is None
    assert rollout.apply_state(e, {"model": {"version": "2", "sha256": "ab" * 32}}, target, T0) is None
    sent = rollout.mark_sent(e, "c", T0)
    assert rollout.apply_state(sent, {"model": {"version": "2", "sha256": "ab" * 32}}, target, T0).state == "SUCCEEDED"


def test_an_illegal_move_is_a_bug_and_raises():
    with pytest.raises(RuntimeError, match="SUCCEEDED -> SENT"):
        rollout.mark_sent(Execution("r1", "a", 0, state=ExecState.SUCCEEDED), "c", T0)


def test_resume_resends_only_to_devices_that_never_answered():
    execs = _execs([["a", "b", "c", "d"]])
    execs = _sent(execs, ["a", "b", "c"])
    execs = _set(execs, ["a"], state="IN_PROGRESS")
    execs = _set(execs, ["b"], state="SUCCEEDED")
    updates, rollbacks = unanswered(execs)
    assert updates == ["c"], "a and b answered; d was never sent (its wave decides that)"
    assert rollbacks == []


def test_store_round_trips_rollouts_and_executions(tmp_path):
    store = Store.open(tmp_path)
    r = replace(_rollout(2), manifest={"name": "m", "version": "2"}, policy=Policy().to_json())
    execs = _sent(_execs([["a"], ["b"]]), ["a"])
    store.save(r, execs, [("r1", None, "created", {"n": 2})])
    store.close()
    again = Store.open(tmp_path)
    assert again.rollout("r1") == r
    assert again.executions("r1") == execs
    assert again.history("r1")[0]["detail"] == {"n": 2}
    assert again._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(ConfigError, match="unknown rollout"):
        again.rollout("nope")


def test_a_command_lost_by_the_broker_is_sent_again_with_the_same_id_only_while_unanswered():
    policy = Policy(device_timeout_s=40)  # re-send every 10 s, at most three times before the timeout
    execs = _sent(_execs([["a", "b", "c", "d"]]), ["a", "b", "c", "d"])
    order = {"a": 0, "b": 1, "c": 2, "d": 3}
    execs = _set(execs, ["d"], state=ExecState.IN_PROGRESS)  # d, sent last, answered: never re-sent
    assert rollout.resend_due(execs, order, {}, policy, T0 + 9.9) == []
    assert rollout.resend_due(execs, order, {}, policy, T0 + 10) == ["a", "b", "c"]
    # c was re-sent at T0 + 10 (publish 4, after d's): due again only once something sent later answers
    order["c"] = 4
    assert rollout.resend_due(execs, order, {"c": T0 + 10}, policy, T0 + 25) == ["a", "b"]
    assert rollout.resend_interval(Policy(device_timeout_s=4)) == 2.0  # never a storm on short timeouts


def test_a_broker_that_is_only_behind_is_not_buried_under_re_sends():
    # a 20,000-device wave on a slow cluster: nobody sent after these answered yet, so they are
    # queued at the broker, not lost; sending them again would only add to the backlog
    policy = Policy(device_timeout_s=40)
    execs = _sent(_execs([["a", "b", "c"]]), ["a", "b", "c"])
    execs = _set(execs, ["a"], state=ExecState.SUCCEEDED)
    assert rollout.resend_due(execs, {"a": 0, "b": 1, "c": 2}, {}, policy, T0 + 30) == []
