"""The one rule for names that become topic levels (device ids, groups, rollout ids, artifact names),
and the one rule for plain file names."""

from __future__ import annotations

import re

from edgefleet.errors import ConfigError

__all__ = ["ID_RULE", "is_plain_file_name", "is_valid_id", "validate_id"]

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ID_RULE = "1-64 characters of letters, digits, '_', '.', '-', starting with a letter or digit"
_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def is_valid_id(value: object) -> bool:
    """True when ``value`` may be used as a topic level: no wildcards, slashes or spaces."""
    return isinstance(value, str) and _ID.match(value) is not None


def is_plain_file_name(value: object) -> bool:
    """A file or directory name with no path in it (artifact files, slot directories): at most 128."""
    return isinstance(value, str) and _FILE.match(value) is not None and value not in (".", "..")


def validate_id(value: str, what: str = "device_id") -> str:
    """Return ``value`` unchanged, or raise.

    Raises:
        ConfigError: ``value`` breaks :data:`ID_RULE` (the message names ``what``).
    """
    if not is_valid_id(value):
        raise ConfigError(f"{what} {value!r}: expected {ID_RULE}")
    return value
