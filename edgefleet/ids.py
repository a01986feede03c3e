"""The one rule for names that become topic levels: device ids, groups and rollout ids."""

from __future__ import annotations

import re

from edgefleet.errors import ConfigError

__all__ = ["ID_RULE", "is_valid_id", "validate_id"]

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ID_RULE = "1-64 characters of letters, digits, '_', '.', '-', starting with a letter or digit"


def is_valid_id(value: object) -> bool:
    """True when ``value`` may be used as a topic level: no wildcards, slashes or spaces."""
    return isinstance(value, str) and _ID.match(value) is not None


def validate_id(value: str, what: str = "device_id") -> str:
    """Return ``value`` unchanged, or raise.

    Raises:
        ConfigError: ``value`` breaks :data:`ID_RULE` (the message names ``what``).
    """
    if not is_valid_id(value):
        raise ConfigError(f"{what} {value!r}: expected {ID_RULE}")
    return value
