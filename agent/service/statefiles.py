"""The few files the service reads or writes itself at start-up: the boot counter and secrets.

Config objects only validate (agent/config.py); reading what they point to happens here, at the
edge, so a bad path or permission becomes one :class:`ConfigError` line naming the key.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from edgefleet.atomic import atomic_write_json
from edgefleet.errors import ConfigError

__all__ = ["bump_boot_counter", "read_secret"]

log = logging.getLogger(__name__)


def bump_boot_counter(state_dir: Path) -> int:
    """Create ``state_dir`` if needed and count this start in ``boot.json`` (atomic write).

    An unreadable counter restarts at 1 with a warning rather than stopping the agent.

    Raises:
        ConfigError: ``state_dir`` cannot be created or written.
    """
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        boot_file = state_dir / "boot.json"
        previous = 0
        if boot_file.is_file():
            try:
                previous = int(json.loads(boot_file.read_text()).get("boot", 0))
            except (ValueError, AttributeError, TypeError):
                log.warning("%s unreadable; boot counter restarts", boot_file)
        boot = previous + 1
        atomic_write_json(boot_file, {"boot": boot})
        return boot
    except OSError as exc:
        raise ConfigError(f"state_dir {state_dir}: {exc.strerror or exc}") from exc


def read_secret(path: Path | None, what: str) -> str | None:
    """The contents of a secret file, stripped (None when not configured).

    Warns when other users can read it; ``what`` names the config key in messages.

    Raises:
        ConfigError: the file cannot be read.
    """
    if path is None:
        return None
    try:
        if path.stat().st_mode & 0o077:
            log.warning("%s %s is readable by other users; chmod 0600 it", what, path)
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot read: {exc.strerror or exc}") from exc
