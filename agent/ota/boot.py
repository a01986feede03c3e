"""Boot's I/O: read (or rebuild) the journal and serve a committed model, with fallback.

What boot does with interrupted work is decided in :mod:`agent.ota.recovery`; the manager
carries that plan out in order, and these are the steps that touch the disk and the host. A
device that cannot serve anything stays reachable (``boot_error``) instead of crash-looping.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from agent.ota.crashpoints import crash_point
from agent.ota.recovery import journal_from_slots, serving_order
from agent.ota.slots import Journal, SlotStore
from edgefleet.errors import ConfigError, EdgefleetError
from edgefleet.manifest import MANIFEST_NAME, Manifest, check_model_file, load_manifest, parse_manifest
from edgefleet.signing import verify_manifest

if TYPE_CHECKING:
    from agent.ota.manager import OtaManager

__all__ = ["boot_problem", "read_journal", "serve_committed", "slot_label", "slot_manifest"]

log = logging.getLogger(__name__)

_SLOT_READ_TRIES = (0.05, 0.2, 0.5)  # waits before re-reading a slot that failed to load at boot, s


def slot_label(slot: str) -> str:
    """The model name part of ``<name>-v<version>-<sha12>`` (for bare models without a manifest)."""
    return slot.rsplit("-", 2)[0]


def slot_manifest(store: SlotStore, slot: str) -> Manifest | None:
    """A kept slot's manifest, or None for a bare model installed without one."""
    path = store.slot_dir(slot) / MANIFEST_NAME
    return parse_manifest(path.read_bytes(), str(path)) if path.is_file() else None


def boot_problem(ota: OtaManager, reason: str) -> None:
    """Say what boot had to work around: ``status()["boot_error"]`` and a ``model_error`` event."""
    ota.boot_error = reason if ota.boot_error is None else f"{ota.boot_error}; {reason}"
    log.error("%s", reason)
    ota._ledger.hand_over({"event": "model_error", "reason": reason})


def read_journal(ota: OtaManager) -> Journal:
    """The journal on disk; a damaged one is set aside and rebuilt, never silently emptied."""
    try:
        return ota.store.read_journal()
    except ConfigError as exc:
        return _rebuild_journal(ota, str(exc))


def _rebuild_journal(ota: OtaManager, damage: str) -> Journal:
    """A journal from the slots whose manifest signature and model sha256 still verify."""
    store = ota.store
    verified: dict[str, str] = {}
    for entry in sorted(store.slots.iterdir()):
        if entry.name.endswith(".tmp"):
            continue  # a slot whose install never finished
        try:
            manifest, raw, sig = load_manifest(entry)
            verify_manifest(raw, sig, list(ota.trusted_keys))
            check_model_file(store.model_path(entry.name), manifest.model, manifest.model.file)
        except (EdgefleetError, OSError):
            continue
        verified[entry.name] = manifest.version
    journal = journal_from_slots(verified, ota.keep_versions)
    try:
        aside = store.set_aside_journal().name
    except OSError:
        aside = "nowhere (it could not be copied)"
    crash_point("journal-set-aside")
    served = (f"serving version {journal.versions[journal.active]}" if journal.active else "no slot verifies")
    damage = damage.replace(str(store.journal_path), store.journal_path.name)  # no device paths
    # Reported before the write: a crash in between rebuilds (and reports) again, never silently.
    boot_problem(ota, f"{damage}; set aside as {aside} and rebuilt from {len(verified)} verified slot(s): "
                      f"{served}, floor {journal.floor}")
    ota._ledger.persist(journal, best_effort=True)
    crash_point("journal-rebuilt")
    return journal


def serve_committed(ota: OtaManager) -> dict[str, str] | None:
    """Serve the journal's active slot, else a kept one, without rewriting the journal.

    A slot that fails to load is tried again a few times (one bad read must not cost the
    device its newer model); if it still fails, a kept slot serves for now, the journal keeps
    naming the active one (nothing is deleted), and the next boot tries it again.
    """
    j = ota._ledger.journal
    errors = []
    for slot in serving_order(j):
        try:
            info = _serve_slot(ota, slot)
        except (EdgefleetError, OSError) as exc:
            errors.append(f"{slot}: {exc}")
            continue
        if slot != j.active:
            boot_problem(ota, f"active slot {j.active} cannot be served ({'; '.join(errors)}); serving the "
                              f"kept version {ota._ledger.version(slot)} for now, the newer slot is kept")
        return info
    if errors:
        boot_problem(ota, "no committed model can be served: " + "; ".join(errors))
    return None


def _serve_slot(ota: OtaManager, slot: str) -> dict[str, str]:
    """Check and activate one slot, retrying a failed read a few times (a transient I/O error)."""
    for wait in (*_SLOT_READ_TRIES, None):
        try:
            model, manifest = ota._checked_slot(slot)
            return dict(ota.host.activate(model, manifest, name=slot_label(slot)))
        except (EdgefleetError, OSError) as exc:
            if wait is None:
                raise
            log.warning("slot %s failed to load (%s); reading it again in %g s", slot, exc, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")
