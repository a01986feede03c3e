"""Input sources: a watched directory of ``.npy`` / ``.png`` / ``.jpg`` frames.

A camera process (or anything) drops files into the folder, ideally written under a temporary
name and renamed in: names starting with ``.`` and anything without a known suffix are ignored,
and a file modified less than ``settle_s`` ago is left for the next scan (for writers that do not
rename). Each file is inferred once, oldest first, then moved to
``done/`` or deleted; a file that cannot be read or inferred is moved to ``failed/`` so it is not
retried forever. Images are resized to the model input and scaled to the manifest's
``preprocessing.input_range`` (default 0..1).

A file is input from outside, so nothing in it may stop the source: an image whose header
promises more than :data:`agent.images.MAX_IMAGE_PIXELS` (a decompression bomb: a few KB of PNG that decode to
gigabytes) is refused before it is decoded, and any other exception while handling one file is
logged and counted, the file goes to ``failed/`` and the thread carries on with the next.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from agent.images import decode_image
from edgefleet.errors import EdgefleetError, InputError

__all__ = ["SUFFIXES", "DirectoryWatcher", "load_input"]

log = logging.getLogger(__name__)

SUFFIXES = (".npy", ".png", ".jpg", ".jpeg")


def load_input(path: Path, input_shape: tuple[int, ...] | None,
               input_range: tuple[float, float] | None = None) -> np.ndarray:
    """Read one file as a model input (an image is decoded by :func:`agent.images.decode_image`).

    Raises:
        InputError: unreadable file, an image larger than :data:`agent.images.MAX_IMAGE_PIXELS`, or an image
            for a model whose input is not [1, H, W, C].
    """
    if path.suffix.lower() == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(f"{path.name}: not a readable .npy array: {exc}") from exc
    with open(path, "rb") as fp:
        return decode_image(fp, input_shape, input_range, path.name)


class DirectoryWatcher:
    """Poll a folder and hand each new file to ``process(path, array)`` on its own thread.

    ``input_shape()`` and ``input_range()`` are asked per file, so an OTA model swap with a new
    input size is followed; while ``input_shape()`` is None (no model yet) files are left alone.
    """

    def __init__(self, path: Path, process: Callable[[Path, Any], None], *,
                 input_shape: Callable[[], tuple[int, ...] | None],
                 input_range: Callable[[], tuple[float, float] | None] = lambda: None,
                 after: str = "move", poll_interval_s: float = 0.5, max_file_bytes: int = 32 << 20,
                 settle_s: float = 0.1) -> None:
        self.path = Path(path)
        self.done_dir = self.path / "done"
        self.failed_dir = self.path / "failed"
        self._process = process
        self._input_shape = input_shape
        self._input_range = input_range
        self.after = after
        self.poll_interval_s = poll_interval_s
        self.max_file_bytes = max_file_bytes
        self.settle_s = settle_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="source-dir", daemon=True)
        self.processed = 0
        self.failed = 0  # files moved to failed/
        self.errors = 0  # unexpected exceptions survived (a bug or the machine, not the file's format)

    def start(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        if self.after == "move":
            self.done_dir.mkdir(exist_ok=True)
        self.failed_dir.mkdir(exist_ok=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def pending(self) -> list[Path]:
        """Files waiting, oldest first."""
        files = []
        newest = time.time() - self.settle_s
        try:
            with os.scandir(self.path) as it:
                for entry in it:
                    if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                        continue
                    if os.path.splitext(entry.name)[1].lower() in SUFFIXES:
                        mtime = entry.stat().st_mtime
                        if mtime <= newest:  # still being written by a writer that does not rename
                            files.append((mtime, entry.name))
        except OSError as exc:
            log.warning("cannot list %s: %s", self.path, exc)
        return [self.path / name for _, name in sorted(files)]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._scan()
            except Exception:  # the thread is the source: it must outlive any one failure
                self.errors += 1
                log.exception("source %s: scan failed; retrying", self.path)
            self._stop.wait(self.poll_interval_s)

    def _scan(self) -> None:
        if self._input_shape() is None:  # no model yet: leave the files for later
            return
        for file in self.pending():
            if self._stop.is_set():
                return
            self._one(file)

    def _one(self, file: Path) -> None:
        try:
            if file.stat().st_size > self.max_file_bytes:
                raise InputError(f"{file.name}: larger than {self.max_file_bytes} bytes")
            x = load_input(file, self._input_shape(), self._input_range())
            self._process(file, x)
        except FileNotFoundError:
            return  # removed by someone else meanwhile
        except EdgefleetError as exc:
            self.failed += 1
            log.warning("source %s: %s", file.name, exc)
            self._move(file, self.failed_dir)
            return
        except Exception:  # a library's own exception or a bug: this file fails, the source goes on
            self.failed += 1
            self.errors += 1
            log.exception("source %s: unexpected error; moved to %s", file.name, self.failed_dir)
            self._move(file, self.failed_dir)
            return
        self.processed += 1
        if self.after == "delete":
            try:
                file.unlink()
            except FileNotFoundError:
                pass
        else:
            self._move(file, self.done_dir)

    @staticmethod
    def _move(file: Path, folder: Path) -> None:
        try:
            os.replace(file, folder / file.name)
        except OSError as exc:
            log.warning("cannot move %s to %s: %s", file, folder, exc)
