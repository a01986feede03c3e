"""The one OTA worker thread: jobs run in order, off the command and inference threads.

An update or rollback is a long job (network, disk, a child process, probation); running it here
means a command reply never waits for it and live inference never waits on the network or disk.
:meth:`Worker.close` asks a running job to stop at its next :meth:`Worker.check_stop`; the job
then leaves the journal as it is and the next boot finishes or undoes the work.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

__all__ = ["Stopping", "Worker"]

log = logging.getLogger(__name__)

Job = Callable[[], None]


class Stopping(Exception):
    """close() was called: leave the journal as it is; the next boot finishes or undoes the work."""


class Worker:
    """Run jobs one at a time on a daemon thread.

    Args:
        idle: condition (over the owner's lock) notified whenever a job ends, for ``wait_idle``.
        on_error: called on the worker thread, with ``idle``'s lock held, when a job raises
            anything but :class:`Stopping` (the owner records the work in flight as failed).
    """

    def __init__(self, idle: threading.Condition, on_error: Callable[[Exception], None]) -> None:
        self._idle = idle
        self._on_error = on_error
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._running = False

    @property
    def busy(self) -> bool:
        """A job is running or waiting (read with ``idle``'s lock held)."""
        return self._running or not self._jobs.empty()

    def start(self) -> None:
        """Start the thread, or start it again after :meth:`close`."""
        with self._idle:
            if self._thread is None or not self._thread.is_alive():
                self._closing.clear()
                self._thread = threading.Thread(target=self._work, name="ota-worker", daemon=True)
                self._thread.start()

    def put(self, job: Job) -> None:
        with self._idle:
            self._running = True
        self._jobs.put(job)

    def check_stop(self) -> None:
        """Raises Stopping once :meth:`close` was called (jobs call it between steps)."""
        if self._closing.is_set():
            raise Stopping()

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop after the current job's next :meth:`check_stop`; waits up to ``timeout_s``."""
        self._closing.set()
        self._jobs.put(None)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=timeout_s)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None or self._closing.is_set():
                return
            try:
                job()
            except Stopping:
                return
            except Exception as exc:
                log.exception("OTA job failed")
                with self._idle:
                    try:
                        self._on_error(exc)
                    except Exception:  # the thread must outlive any one job, or no update ever runs again
                        log.exception("recording the failed OTA job failed too")
            finally:
                with self._idle:
                    self._running = not self._jobs.empty()
                    self._idle.notify_all()
