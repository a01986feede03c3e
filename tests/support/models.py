"""Where the test models live (tests/data/models; scripts/make_test_models.py made them)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["MODELS", "OTA_MODELS"]

MODELS = Path(__file__).resolve().parents[1] / "data" / "models"
OTA_MODELS = MODELS / "ota"
