"""Output roles: a detector's reuse is judged on its detections, not on every raw value.

BlazeFace's raw outputs hold 896 anchor logits, most of them background that swings by tens of
units under sensor noise; judged per output range, nearly every pair of frames "differs". With
``output_roles`` (manifest or ``Engine(output_roles=...)``), scores are judged after their sigmoid
where some result detects, and boxes only at detected anchors. The manifest field is validated
strictly: a role that names a missing output, or boxes with no scores to follow, is refused.
"""

from __future__ import annotations

import numpy as np
import pytest

from agent import Engine
from agent.cache import OutputJudge, output_change, output_tolerances
from edgefleet.errors import ArtifactError, ConfigError
from edgefleet.manifest import OutputRole
from edgefleet.profiles import CacheSettings
from edgefleet.testing.artifacts import build_artifact

pytestmark = pytest.mark.runtime

ANCHORS = 896
JUDGES = (OutputJudge("scores", "sigmoid", 0.5, -1), OutputJudge("boxes", "none", 0.5, 0))
ROLES = [{"output": "classificators", "role": "scores", "activation": "sigmoid"},
         {"output": "regressors", "role": "boxes"}]


def _detections(background: float, face_logit: float = 3.0, box_shift: float = 0.0, seed: int = 0):
    """BlazeFace-shaped outputs: background logits around ``background``, one face at anchor 100."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(background, 10.0, (1, ANCHORS, 1)).astype(np.float32)
    logits[0, 100, 0] = face_logit
    boxes = rng.normal(0.0, 30.0, (1, ANCHORS, 16)).astype(np.float32)  # garbage where nothing is
    boxes[0, 100] = np.float32(5.0)  # its keypoints
    boxes[0, 100, :4] = np.float32([2.0 + box_shift, -1.0, 40.0, 40.0])
    return logits, boxes


def _change(a, b):
    tols = output_tolerances([a, b], JUDGES, 0.05)
    return output_change(a, b, classifier=False, tolerances=tols, judges=JUDGES)


def test_background_anchors_swinging_by_tens_of_logits_do_not_count():
    assert _change(_detections(-40.0, seed=1), _detections(-60.0, seed=2)) <= 1.0


def test_raw_judgement_of_the_same_pair_calls_it_different():
    a, b = _detections(-40.0, seed=1), _detections(-60.0, seed=2)
    tols = output_tolerances([a, b], None, 0.05)
    assert output_change(a, b, classifier=False, tolerances=tols) > 1.0


def test_a_face_whose_score_drops_is_a_disagreement():
    assert _change(_detections(-40.0, face_logit=3.0), _detections(-40.0, face_logit=0.3)) > 1.0


def test_a_face_that_appears_is_a_disagreement():
    assert _change(_detections(-40.0, face_logit=-9.0), _detections(-40.0, face_logit=3.0)) > 1.0


def test_a_detected_box_that_moves_beyond_the_tolerance_is_a_disagreement():
    a = _detections(-40.0)
    assert _change(a, _detections(-40.0, box_shift=0.5)) <= 1.0
    assert _change(a, _detections(-40.0, box_shift=8.0)) > 1.0


def test_boxes_take_their_range_only_where_a_face_is_detected():
    tols = output_tolerances([_detections(-40.0)], JUDGES, 0.05)
    assert tols[0] == pytest.approx(0.05)  # sigmoid scores span 0..1
    assert tols[1] == pytest.approx(0.05 * (40.0 - -1.0))  # anchor 100's values, not the garbage


def _manifest(**extra):
    base = {"schema_version": 1, "name": "det", "version": "1", "created": "2026-01-01T00:00:00Z",
            "converter_version": "t", "profile": "x86-dev", "task": "other",
            "model": {"sha256": "0" * 64, "size": 1},
            "inputs": [{"name": "input", "shape": [1, 128, 128, 3], "dtype": "float32"}],
            "outputs": [{"name": "classificators", "shape": [1, 896, 1], "dtype": "float32"},
                        {"name": "regressors", "shape": [1, 896, 16], "dtype": "float32"}]}
    from edgefleet.manifest import parse_manifest

    return parse_manifest({**base, **extra})


def test_manifest_without_output_roles_still_parses():
    assert _manifest().output_roles is None


def test_manifest_output_roles_by_name_and_index_parse():
    m = _manifest(output_roles=[{"output": 0, "role": "scores", "activation": "sigmoid", "threshold": 0.6},
                                {"output": "regressors", "role": "landmarks", "scores": 0}])
    assert m.output_roles is not None and m.output_roles[0].score_threshold == 0.6


@pytest.mark.parametrize("roles, message", [
    ([{"output": "boxes", "role": "scores", "activation": "sigmoid"}], "expected one of the outputs"),
    ([{"output": 2, "role": "regression"}], "expected an index 0..1"),
    ([{"output": True, "role": "regression"}], "output"),
    ([{"output": 0, "role": "scores", "activation": "sigmoid"}, {"output": 0, "role": "logits"}], "two roles"),
    ([{"output": 1, "role": "boxes"}], "exactly one output with role scores"),
    ([{"output": 0, "role": "regression"}, {"output": 1, "role": "boxes", "scores": 0}], "has no role scores"),
    ([{"output": 1, "role": "boxes", "threshold": 0.5}], "apply to role scores only"),
    ([{"output": 0, "role": "scores"}], "needs a threshold"),
    ([{"output": 0, "role": "scores", "activation": "sigmoid", "threshold": 1.5}], "0 < threshold < 1"),
    ([{"output": 0, "role": "scores", "activation": "tanh"}], "activation"),
    ([{"output": 0, "role": "scores", "activation": "sigmoid", "colour": "red"}], "colour"),
])
def test_manifest_output_roles_that_do_not_fit_are_refused(roles, message):
    with pytest.raises(ArtifactError, match=message):
        _manifest(output_roles=roles)


def test_manifest_boxes_with_other_anchors_than_their_scores_are_refused():
    outputs = [{"name": "classificators", "shape": [1, 896, 1], "dtype": "float32"},
               {"name": "regressors", "shape": [1, 100, 16], "dtype": "float32"}]
    with pytest.raises(ArtifactError, match="anchors"):
        _manifest(outputs=outputs, output_roles=ROLES)


def test_engine_judges_a_detector_by_its_roles(models):
    engine = Engine(models / "face_detection_short_range.tflite", profile="x86-dev", autotune=False,
                    cache=CacheSettings(), output_roles=[OutputRole.model_validate(r) for r in ROLES])
    assert engine.stats()["cache"]["judged_by"] == "roles: scores, boxes"


def test_engine_refuses_roles_naming_an_output_the_model_lacks(models):
    with pytest.raises(ConfigError, match="output_roles"):
        Engine(models / "face_detection_short_range.tflite", profile="x86-dev", autotune=False, cache=True,
               output_roles=[OutputRole(output="boxes", role="scores", activation="sigmoid")])


def test_manifest_output_roles_reach_the_cache(models, tmp_path):
    art = build_artifact(models / "face_detection_short_range.tflite", tmp_path / "det", golden_samples=0,
                         task="other", output_roles=ROLES)
    engine = Engine(art.dir, profile="x86-dev", autotune=False, cache=True)
    assert engine.stats()["cache"]["judged_by"] == "roles: scores, boxes"
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (1, 128, 128, 3)).astype(np.float32)
    for _ in range(3):  # recorded verdicts go through the role judgement without error
        engine.infer(x + rng.normal(0, 0.01, x.shape).astype(np.float32))
    assert engine.stats()["cache"]["verdicts"] == 2
