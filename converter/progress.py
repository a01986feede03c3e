"""Progress bars for the slow steps (calibration, fine-tuning, the fidelity search)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["Bars", "Tick"]

Tick = Callable[[int], None]


class Bars:
    """tqdm progress bars on stderr, or nothing (``--quiet``, the API default)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    @contextmanager
    def bar(self, desc: str, total: int | None) -> Iterator[Tick | None]:
        """Yield a function that advances the bar, or None when bars are off."""
        if not self.enabled:
            yield None
            return
        from tqdm import tqdm
        # disable=None: no bars when stderr is not a terminal (logs, CI, the demo)
        with tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True, disable=None) as bar:
            yield bar.update
