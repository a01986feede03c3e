"""ConvertOptions: every bad option is refused when the options are built, naming the flag."""

from __future__ import annotations

from pathlib import Path

import pytest

from converter.options import ConvertOptions
from edgefleet.errors import ConfigError


@pytest.mark.parametrize(("field", "value", "message"), [
    ("version", "v2", "--artifact-version"),
    ("name", "-bad name", "--name"),
    ("prune_channels", 1.0, "--prune-channels"),
    ("sparsity", -0.1, "--sparsity"),
    ("prune_allocation", "random", "--prune-allocation"),
    ("finetune_epochs", -1, "--finetune-epochs"),
    ("eval_fraction", 0.0, "eval_fraction"),
    ("latency_runs", 0, "latency_runs"),
])
def test_bad_option_is_refused_at_construction_naming_the_flag(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ConvertOptions(**{field: value})


def test_artifact_name_defaults_to_the_model_file_name_made_safe() -> None:
    assert ConvertOptions().artifact_name(Path("/m/digits v2.keras")) == "digits-v2"
    assert ConvertOptions(name="given").artifact_name(Path("x.keras")) == "given"
    with pytest.raises(ConfigError, match="--name"):
        ConvertOptions().artifact_name(Path("/m/" + "x" * 70 + ".keras"))


def test_sign_key_given_as_text_becomes_a_path() -> None:
    assert ConvertOptions(sign_key="keys/signing.key").sign_key == Path("keys/signing.key")  # type: ignore[arg-type]


@pytest.mark.parametrize("fields", [{"labels": ()}, {"labels": ("a", "")}, {"fleet": "a/b"}, {"groups": ("#",)}])
def test_bad_labels_fleet_or_groups_are_refused_before_anything_runs(fields) -> None:
    with pytest.raises(ConfigError):
        ConvertOptions(**fields)
