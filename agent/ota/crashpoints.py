"""Named crash points for the crash-safety tests (test-only, inert in production).

``crash_point("after-download")`` kills the process with ``os._exit(137)`` (what ``kill -9``
leaves behind: no cleanup, no flush, no atexit) when the environment variable
``EDGEFLEET_CRASH_AT`` names that point. The variable is read once at import; nobody sets it on
a device, so in production each call is one comparison with None.

The points, in the order a boot and an update reach them, are listed in :data:`CRASH_POINTS`;
``tests/integration/test_ota_crash_points.py`` kills a real agent process at every one and
checks the next start serves a valid committed model and finishes or undoes the update.
"""

from __future__ import annotations

import os

__all__ = ["CRASH_POINTS", "ENV_VAR", "crash_point"]

ENV_VAR = "EDGEFLEET_CRASH_AT"

CRASH_POINTS = (
    "journal-set-aside",    # boot: damaged journal copied aside, the rebuilt one not written yet
    "journal-rebuilt",      # boot: rebuilt journal written, the boot not finished
    "boot-counted",         # boot: this boot counted in pending.boots (crash loops), work not resumed
    "queued",               # update accepted and persisted, worker not started on it
    "download-partial",     # part of the file is in staging
    "downloaded",           # whole file in staging, not verified yet
    "verified",             # hash/size checked
    "validated",            # child-process validation passed
    "slot-moved",           # the staged file moved into the half-built slot, not fsynced yet
    "slot-partial",         # the slot is half built: model in, manifest not yet
    "slot-written",         # slot complete, not yet serving
    "activated",            # new model serving, probation not yet persisted
    "probation",            # inside probation, some inferences observed
    "commit-before-journal",  # probation passed, journal not yet written
    "commit-after-journal",   # journal says committed, event not yet emitted
    "rollback-reverted",    # probation failed, old model serving again, journal not yet written
    "operator-rollback",    # rollback command: target activated, journal not yet written
    "hung-recorded",        # a committed model hung: journal names the previous slot, agent not yet exited
)

_AT = os.environ.get(ENV_VAR) or None


def crash_point(name: str) -> None:
    """Die here, like a power cut, if the crash-safety test asked for this point."""
    if _AT is not None and _AT == name:
        os._exit(137)
