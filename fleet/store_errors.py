"""The error a store backend raises when its database is away (apart, so backends need not import the store)."""

from __future__ import annotations

from edgefleet.errors import TransportError

__all__ = ["StoreUnavailable"]


class StoreUnavailable(TransportError):
    """The database cannot be reached (or dropped the connection); retrying later may work (exit 4)."""
