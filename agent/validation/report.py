"""What validating one model file found: the one value the child prints and the parent returns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ValidationReport", "fail"]


@dataclass(frozen=True)
class ValidationReport:
    """Outcome of validating one model file. ``reason`` is one line when ``ok`` is False."""

    ok: bool
    reason: str | None = None
    latency_ms: float | None = None
    inputs: tuple[Mapping[str, Any], ...] = ()
    outputs: tuple[Mapping[str, Any], ...] = ()
    golden: Mapping[str, Any] = field(default_factory=dict)
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "reason": self.reason, "latency_ms": self.latency_ms,
                "inputs": [dict(t) for t in self.inputs], "outputs": [dict(t) for t in self.outputs],
                "golden": dict(self.golden), "details": dict(self.details)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ValidationReport:
        return cls(ok=bool(data["ok"]), reason=data.get("reason"), latency_ms=data.get("latency_ms"),
                   inputs=tuple(data.get("inputs") or ()), outputs=tuple(data.get("outputs") or ()),
                   golden=dict(data.get("golden") or {}), details=dict(data.get("details") or {}))


def fail(reason: str, **details: Any) -> ValidationReport:
    return ValidationReport(ok=False, reason=reason, details=details)
