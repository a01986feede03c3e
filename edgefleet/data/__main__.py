"""``python3 -m edgefleet.data``: print where the shipped unit files and examples are."""

from __future__ import annotations

from edgefleet.data import FILES, path

for name in FILES:
    print(path(name))
