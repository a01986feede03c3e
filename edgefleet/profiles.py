"""Device profiles: what the converter and the agent need to know about a target.

A profile is a YAML file in ``device_profiles/`` (found by name) or anywhere (found by path).
Loading validates it strictly: unknown keys, missing keys, wrong types and impossible values
raise :class:`~edgefleet.errors.ConfigError` with one line naming the file, the key and what was
expected. The schema below is the documentation of every field (see ``docs/profiles.md``).
"""

from __future__ import annotations

import platform
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgefleet.errors import ConfigError

__all__ = [
    "CACHE_STRICTER",
    "CacheSettings",
    "Profile",
    "default_profile",
    "format_validation_error",
    "list_profiles",
    "load_profile",
    "loosened_cache_fields",
    "profile_dir",
    "read_yaml_file",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class Hardware(_Strict):
    arch: Literal["armv7l", "aarch64", "x86_64"] = Field(description="CPU architecture as `uname -m` prints it")
    cpu: str = Field(description="CPU model, for people")
    cores: int = Field(ge=1, le=256, description="CPU cores")
    cpu_mhz: int = Field(ge=100, le=10000, description="Maximum CPU clock, MHz")
    memory_mb: int = Field(ge=64, description="RAM of the smallest supported variant, MB")


class Runtime(_Strict):
    interpreter: Literal["ai-edge-litert", "tflite-runtime", "any"] = Field(
        description="Interpreter package the device can install")
    accelerator: Literal["none", "edgetpu"] = Field(description="Accelerator attached to the device")
    accelerator_required: bool = Field(
        default=False, description="Refuse to run on the CPU when the accelerator is missing")
    threads: int = Field(ge=1, le=64, description="Interpreter threads per instance")
    instances: int = Field(ge=1, le=16, description="Interpreter instances in the pool")
    objective: Literal["latency", "throughput"] = Field(
        default="latency", description="What the autotune step optimizes")
    autotune: bool = Field(default=True, description="Try a few threads x instances layouts at activation")

    @model_validator(mode="after")
    def _required_needs_accelerator(self) -> Runtime:
        if self.accelerator_required and self.accelerator == "none":
            raise ValueError("accelerator_required is true but accelerator is 'none'")
        return self


class Quantization(_Strict):
    scheme: Literal["full_int8"] = Field(default="full_int8", description="Integer quantization scheme")
    input_dtype: Literal["int8", "uint8"] = Field(description="Model input tensor dtype")
    output_dtype: Literal["int8", "uint8"] = Field(description="Model output tensor dtype")
    per_channel: bool = Field(default=True, description="Per-channel weight scales (else per-tensor)")
    require_full_integer: bool = Field(
        description="Every op must be integer (Edge TPU); float fallback is never allowed")
    allow_16bit_activations: bool = Field(
        default=True, description="The fidelity search may use int16 activations (16x8)")
    allow_float_fallback: bool = Field(
        default=True, description="The fidelity search may keep sensitive layers in float")

    @model_validator(mode="after")
    def _full_integer_forbids_fallback(self) -> Quantization:
        if self.require_full_integer and (self.allow_float_fallback or self.allow_16bit_activations):
            raise ValueError("require_full_integer forbids allow_float_fallback and allow_16bit_activations")
        return self


class Fidelity(_Strict):
    """The converter's gate: how close to the float model, and how fast, a shipped model must be."""

    max_top1_drop_pct: float = Field(ge=0, le=100, description="Largest top-1 accuracy drop, points")
    min_top1_agreement_pct: float = Field(
        ge=0, le=100, description="Smallest top-1 agreement with float, %: the 95% Wilson lower bound must reach it")
    min_cosine: float = Field(default=0.98, ge=-1, le=1, description="Smallest mean output cosine similarity")
    max_class_drop_pct: float | None = Field(
        default=None, ge=0, le=100,
        description="Largest agreement drop below 100% of any one float class, points (None: not bounded)")
    max_slowdown: float | None = Field(
        default=1.5, ge=1, description="Largest host latency vs the fastest full-int8 candidate, x (None: no limit)")


class Limits(_Strict):
    max_model_mb: float = Field(gt=0, description="Largest model file the device accepts, MB")
    latency_budget_ms: float = Field(gt=0, description="Health-check latency budget per inference, ms")
    max_download_mb: float = Field(default=256, gt=0, description="Largest OTA download, MB")


class Probation(_Strict):
    inferences: int = Field(default=50, ge=1, description="Inferences watched before commit")
    seconds: float = Field(default=30, gt=0, description="Longest probation, s (commit at whichever ends first)")
    max_error_rate: float = Field(default=0.01, ge=0, le=1, description="Largest failed-inference fraction")
    min_agreement: float = Field(default=0.9, ge=0, le=1, description="Smallest top-1 agreement with the previous model in shadow")
    shadow_fraction: float = Field(default=0.25, ge=0, le=1, description="Fraction of live inputs also run on the previous model")
    max_latency_factor: float = Field(default=3.0, gt=0, description="Largest p95 latency vs the budget")


class CacheSettings(_Strict):
    """Every input-locality cache setting, defined once: a profile's ``cache:`` block, the
    ``cache:`` overrides in agent.yaml, the ``config`` command and the engine's runtime cache all
    use this model (``enabled`` is for the service; the cache itself ignores it)."""

    enabled: bool = Field(default=True, description="Input-locality cache on by default")
    max_bytes: int = Field(default=8 * 1024 * 1024, ge=0, description="Exact-cache capacity, bytes (0 disables the exact layer)")
    near: bool = Field(default=True, description="Near-duplicate reuse on/off")
    near_threshold: float = Field(default=0.25, ge=0, le=1, description="Distance ceiling of a near-duplicate candidate (mean abs diff of signatures, fraction of the input range, 0..1); below it the score bands and their evidence decide")
    max_age_s: float = Field(default=2.0, ge=0, description="Longest time a computed result is reused, s")
    max_consecutive: int = Field(default=10, ge=0, description="Most near-duplicate reuses in a row")
    verify_fraction: float = Field(default=0.05, ge=0, le=1, description="Fraction of near hits recomputed to measure disagreement")
    target_disagreement: float = Field(default=0.01, ge=0, le=1, description="Disagreement rate the threshold is tuned to stay under")
    output_tolerance: float = Field(default=0.05, ge=0, description="Non-classifiers: largest abs output difference that still agrees, fraction of the output range")
    seed: int = Field(default=0, description="Seed of the verification sampling, for reproducible runs")
    confidence: float = Field(default=0.95, ge=0.5, lt=1, description="Confidence of the upper bound on disagreement that must stay under target_disagreement before a band of (distance, margin) is reused (one-sided Clopper-Pearson)")
    max_verify_fraction: float = Field(default=0.5, ge=0, le=1, description="Fraction of near hits recomputed in a band whose evidence is still thin (falls to verify_fraction as verdicts accumulate)")
    evidence_window: int = Field(default=1024, ge=64, le=1_000_000, description="Verdicts a band keeps before its counts are halved, so old evidence fades and a changed stream shows within about this many verdicts")


CACHE_STRICTER: dict[str, Literal["lower", "higher", "false", "any"]] = {
    "enabled": "false",  # off: every answer is the model's own
    "max_bytes": "lower",  # exact hits never change an answer, but memory is the device's to bound
    "near": "false",  # exact layer only
    "near_threshold": "lower",
    "max_age_s": "lower",
    "max_consecutive": "lower",
    "verify_fraction": "higher",
    "target_disagreement": "lower",
    "output_tolerance": "lower",
    "seed": "any",  # picks which near hits are verified, not how many
    "confidence": "higher",  # a wider bound must still be under the target before reuse
    "max_verify_fraction": "higher",
    "evidence_window": "lower",  # old evidence fades sooner: a changed stream shows sooner
}
"""Which way each :class:`CacheSettings` field makes the cache stricter (closer to "the model ran").

The one definition of "stricter": a ``config`` command that is not signed may only move fields
this way from the device's approved settings (``agent/service/handlers.py``). ``any``: the
field changes no answer and no bound, so it is free.
"""
_NEAR_ONLY = frozenset({"near_threshold", "max_age_s", "max_consecutive", "verify_fraction",
                        "target_disagreement", "output_tolerance", "confidence", "max_verify_fraction",
                        "evidence_window"})
if set(CACHE_STRICTER) != set(CacheSettings.model_fields):  # a new field must say which way is stricter
    raise RuntimeError(f"CACHE_STRICTER covers {sorted(CACHE_STRICTER)}, "
                       f"expected every CacheSettings field {sorted(CacheSettings.model_fields)}")


def loosened_cache_fields(approved: CacheSettings, proposed: CacheSettings) -> list[str]:
    """The fields in which ``proposed`` is looser than ``approved`` (empty: as strict or stricter).

    A cache that is off cannot be loose, and the near-duplicate fields do not matter while
    ``near`` is off, so those compare as not loosened.
    """
    if not proposed.enabled:
        return []
    loose = []
    for name, direction in CACHE_STRICTER.items():
        if name in _NEAR_ONLY and not proposed.near:
            continue
        old, new = getattr(approved, name), getattr(proposed, name)
        if (direction == "lower" and new > old) or (direction == "higher" and new < old) \
                or (direction == "false" and new and not old):
            loose.append(name)
    return loose


class Profile(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,40}$", description="Profile name (file stem)")
    description: str = Field(description="One line for `edge-convert --list-profiles`")
    hardware: Hardware
    runtime: Runtime
    quantization: Quantization
    fidelity: Fidelity
    limits: Limits
    probation: Probation = Probation()
    cache: CacheSettings = CacheSettings()

    @model_validator(mode="after")
    def _edgetpu_needs_full_integer(self) -> Profile:
        if self.runtime.accelerator == "edgetpu" and not self.quantization.require_full_integer:
            raise ValueError("accelerator 'edgetpu' needs quantization.require_full_integer: true")
        return self

    def summary(self) -> str:
        hw = self.hardware
        acc = "" if self.runtime.accelerator == "none" else f", {self.runtime.accelerator}"
        return (f"{self.name:16s} {hw.arch:8s} {hw.cores} cores @ {hw.cpu_mhz} MHz, "
                f"{hw.memory_mb} MB{acc}: {self.description}")


_DEFAULT_BY_ARCH = {"x86_64": "x86-dev", "amd64": "x86-dev", "aarch64": "generic-aarch64", "arm64": "generic-aarch64"}


def default_profile() -> str:
    """The profile used when none is given: chosen by this machine's architecture.

    Raises:
        ConfigError: a 32-bit ARM OS, where no runtime wheel exists for Python 3.11.
    """
    machine = platform.machine().lower()
    if machine.startswith(("armv7", "armv6")):
        raise ConfigError(f"{machine}: 32-bit ARM OS is not supported (no runtime wheel for Python 3.11): "
                          "install 64-bit Raspberry Pi OS (docs/profiles.md)")
    return _DEFAULT_BY_ARCH.get(machine, "generic-aarch64")


def profile_dir() -> Path:
    """The folder of profiles that ship with the package."""
    return Path(str(resources.files("device_profiles")))


def list_profiles() -> list[Profile]:
    """Every shipped profile, by name. Raises ConfigError if one of them is broken."""
    return [load_profile(p) for p in sorted(profile_dir().glob("*.yaml"))]


def format_validation_error(source: str, exc: ValidationError) -> str:
    """One line: the file, the first bad key, what was expected."""
    err = exc.errors()[0]
    key = ".".join(str(part) for part in err["loc"]) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        what = "unknown key"
    elif kind == "missing":
        what = "missing required key"
    else:
        what = err["msg"].replace("Value error, ", "")
        if "input" in err and kind not in ("model_type",) and not isinstance(err["input"], dict):
            what += f", got {err['input']!r}"
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{source}: {key}: {what}{more}"


def read_yaml_file(path: Path) -> Any:
    """Parse a YAML file; a syntax or encoding error becomes one ConfigError line naming the file."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{path}: not valid YAML: {first}") from exc


def load_profile(name_or_path: str | Path) -> Profile:
    """Load and validate a profile given by name (``rpi4``) or by path.

    Raises:
        ConfigError: the profile is not found, is not YAML, or does not fit the schema.
    """
    return _load_cached(str(name_or_path))


@lru_cache(maxsize=64)
def _load_cached(name_or_path: str) -> Profile:
    path = Path(name_or_path)
    looks_like_path = path.suffix in (".yaml", ".yml") or "/" in name_or_path
    if not looks_like_path:
        path = profile_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in profile_dir().glob("*.yaml")))
            raise ConfigError(f"unknown profile {name_or_path!r}: expected one of {known} or a path to a .yaml file")
    if not path.is_file():
        raise ConfigError(f"{path}: profile file not found")
    data = read_yaml_file(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of profile keys, got {type(data).__name__}")
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(str(path), exc)) from exc
