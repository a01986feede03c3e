"""The conversion options, validated once when they are built (by the CLI or by ``convert(**options)``).

Pure values: no file is opened here (the signing key is checked by :func:`converter.convert`), and
nothing imports TensorFlow, so ``edge-convert`` rejects a bad flag before paying for it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from edgefleet.errors import ArtifactError, ConfigError
from edgefleet.ids import validate_id
from edgefleet.manifest import parse_version

__all__ = ["PRUNE_ALLOCATIONS", "ConvertOptions", "parse_input_shape"]

PRUNE_ALLOCATIONS = ("uniform", "width", "cost")  # see converter.pruning._fractions
def _check_name(name: str) -> str:
    return validate_id(name, "--name")


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``"image=1,224,224,3"`` -> ``("image", (1, 224, 224, 3))``.

    Raises:
        ConfigError: not NAME=D,D,... with positive integer dimensions.
    """
    name, sep, dims = text.partition("=")
    try:
        shape = tuple(int(d) for d in dims.split(","))
    except ValueError:
        shape = ()
    if not sep or not name.strip() or not shape or any(d < 1 for d in shape):
        raise ConfigError(f"--input-shape {text!r}: expected NAME=1,D,D,... with positive integers, "
                          "e.g. image=1,224,224,3")
    return name.strip(), shape


@dataclass(frozen=True)
class ConvertOptions:
    """How to convert; every field is checked in ``__post_init__``.

    Raises:
        ConfigError: a field is out of range (the message names the CLI flag).
    """

    version: str = "1"  # artifact version, dotted numbers ("3", "1.4.2")
    name: str | None = None  # artifact name; None: from the model's file name
    input_range: tuple[float, float] | None = None  # float (low, high) the model expects; images are scaled to it
    prune_channels: float = 0.0  # fraction of the prunable channels removed, in [0, 1)
    prune_allocation: str = "cost"  # how prune_channels is spread over layers: one of PRUNE_ALLOCATIONS
    sparsity: float = 0.0  # fraction of the Conv2D/Dense weights set to zero, in [0, 1)
    finetune_epochs: int = 3  # distillation epochs after pruning (0: none)
    eval_fraction: float = 0.2  # fraction of the calibration samples held out when no eval data is given
    latency_runs: int = 30  # timed invoke() calls per host latency figure in the report
    keep_tensor_names: bool = False  # keep intermediate tensor names in model.tflite (bytes, for Netron)
    sign_key: Path | None = None  # Ed25519 PEM private key file; None: unsigned
    progress: bool = False  # tqdm bars on stderr
    signature: str | None = None  # SavedModel signature to convert; None: serving_default (or the only one)
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (input name, full shape) for dynamic dims
    custom_objects: Path | None = None  # Python file whose classes/functions Keras may deserialize
    labels: tuple[str, ...] | None = None  # class names by output index (--labels FILE, one per line)
    expires: str | None = None  # ISO 8601 UTC after which devices refuse the manifest (freeze attacks)
    fleet: str | None = None  # the fleet the artifact is meant for; devices of other fleets refuse it
    groups: tuple[str, ...] | None = None  # the groups it is meant for; None: any group

    def __post_init__(self) -> None:
        try:
            parse_version(self.version)
        except ArtifactError as exc:
            raise ConfigError(f"--artifact-version {self.version!r}: expected dotted numbers such as 3 or 1.4.2") from exc
        if self.name is not None:
            _check_name(self.name)
        for flag, value in (("--prune-channels", self.prune_channels), ("--sparsity", self.sparsity)):
            if not 0 <= value < 1:
                raise ConfigError(f"{flag} {value}: expected a fraction in [0, 1)")
        if self.prune_allocation not in PRUNE_ALLOCATIONS:
            raise ConfigError(f"--prune-allocation {self.prune_allocation!r}: expected one of "
                              f"{', '.join(PRUNE_ALLOCATIONS)}")
        if self.finetune_epochs < 0:
            raise ConfigError(f"--finetune-epochs {self.finetune_epochs}: expected 0 or more")
        if not 0 < self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction {self.eval_fraction}: expected a fraction in (0, 1)")
        if self.latency_runs < 1:
            raise ConfigError(f"latency_runs {self.latency_runs}: expected 1 or more")
        if self.labels is not None and (not self.labels or len(self.labels) > 100_000
                                        or any(not label or len(label) > 256 for label in self.labels)):
            raise ConfigError("--labels: expected 1-100000 non-empty lines of at most 256 characters")
        for what, value in (("--fleet", self.fleet), *(("--group", g) for g in self.groups or ())):
            if value is not None:
                validate_id(value, what)
        for attr in ("sign_key", "custom_objects"):
            value = getattr(self, attr)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, attr, Path(value))
        if isinstance(self.input_shapes, dict):
            object.__setattr__(self, "input_shapes", tuple(self.input_shapes.items()))
        names = [name for name, _ in self.input_shapes]
        if len(set(names)) != len(names):
            raise ConfigError(f"--input-shape: input named twice in {names}")
        for name, shape in self.input_shapes:
            if not shape or any(int(d) < 1 for d in shape):
                raise ConfigError(f"--input-shape {name}: expected positive dimensions, got {shape}")
        if self.signature is not None and not self.signature.strip():
            raise ConfigError("--signature: expected a signature name")

    @property
    def prunes(self) -> bool:
        return self.prune_channels > 0 or self.sparsity > 0

    def artifact_name(self, model: Path) -> str:
        """``name``, else the model's file name made safe (checked the same way).

        Raises:
            ConfigError: the derived name is not a valid artifact name.
        """
        if self.name is not None:
            return self.name
        return _check_name(re.sub(r"[^A-Za-z0-9_.-]", "-", model.stem if model.suffix else model.name))
