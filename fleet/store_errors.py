"""The error a store backend raises when its database is away (apart, so backends need not import the store)."""

from __future__ import annotations

from edgefleet.errors import ConfigError

__all__ = ["StoreUnavailable"]


class StoreUnavailable(ConfigError):
    """The database cannot be reached (or dropped the connection); retrying later may work."""
