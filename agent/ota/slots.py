"""Model slots and the OTA journal under ``state_dir``: what is committed, what is in flight.

Layout::

    state_dir/
      journal.json                 the single source of truth (atomic write: temp, fsync, rename)
      slots/<slot>/model.tflite    one directory per kept version (+ manifest.json, .sig)
      staging/<rollout_id>/        download in progress (model.tflite.part) and the command

Invariant: ``journal.active`` always names a complete, verified, committed slot. A new model is
served during probation while the journal still names the old one as active, so a crash at any
moment restarts on a committed model. Committing is one journal write; rolling back is a pointer
swap (no copy). Slots that no journal entry names are leftovers of a crash and are deleted.

The :class:`Journal` is an immutable value; the functions here that change it return a new one
(deciding), and :class:`SlotStore` does the file I/O (doing). Every move of the work in flight is
checked against :data:`edgefleet.messages.OTA_TRANSITIONS` before it is returned, so a step taken
out of order fails loudly instead of being written down.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Set as AbstractSet
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

from edgefleet.atomic import atomic_write_bytes, atomic_write_json, fsync_dir
from edgefleet.errors import ArtifactError, ConfigError, StorageError
from edgefleet.ids import is_plain_file_name
from edgefleet.manifest import MANIFEST_NAME, MODEL_NAME, SIGNATURE_NAME, parse_version
from edgefleet.messages import OtaState, check_transition

__all__ = ["JOURNAL_NAME", "Journal", "Outcome", "Pending", "SlotStore", "highest_version", "slot_name"]

JOURNAL_NAME = "journal.json"


def highest_version(*versions: str | None) -> str | None:
    """The highest of some dotted versions (None ignored); None when there are none."""
    known = [v for v in versions if v is not None]
    return max(known, key=parse_version) if known else None


def slot_name(name: str, version: str, sha256: str) -> str:
    """``clf-v3-1a2b3c4d5e6f``: readable, unique per file, and always a plain directory name."""
    candidate = f"{name}-v{version}-{sha256[:12]}"
    if not is_plain_file_name(candidate):
        raise ArtifactError(f"slot name {candidate!r} is not a plain directory name")
    return candidate


@dataclass(frozen=True)
class Pending:
    """The update or rollback in flight (persisted before each step takes effect)."""

    kind: Literal["update", "rollback"]
    rollout_id: str
    version: str
    state: OtaState
    slot: str | None = None  # target slot once known
    from_slot: str | None = None  # the committed slot when it started
    boots: int = 0  # boots in a row that found it in ``boot_state`` (a crash loop ends it, recovery.py)
    boot_state: OtaState | None = None


@dataclass(frozen=True)
class Outcome:
    """The last finished update or rollback, kept until its event has been handed over."""

    rollout_id: str
    version: str
    state: OtaState
    reason: str | None = None
    rollback: bool = False
    reported: bool = False
    hung: bool = False  # the committed model hung and was given up (agent.ota.hang); boot reports it


_R = TypeVar("_R", Pending, Outcome)


def _record_json(record: Pending | Outcome) -> dict[str, Any]:
    data = {**asdict(record), "state": record.state.value}
    if data.get("boot_state") is not None:
        data["boot_state"] = data["boot_state"].value
    return data


def _record(cls: type[_R], data: dict[str, Any]) -> _R:
    """Raises ValueError for a state that is not an :class:`OtaState` (a damaged journal)."""
    if data.get("boot_state") is not None:
        data = {**data, "boot_state": OtaState(data["boot_state"])}
    return cls(**{**data, "state": OtaState(data["state"])})


@dataclass(frozen=True)
class Journal:
    active: str | None = None
    history: tuple[str, ...] = ()  # older committed slots still kept, most recent first
    versions: dict[str, str] = field(default_factory=dict)  # slot -> version
    pending: Pending | None = None
    outcome: Outcome | None = None
    floor: str | None = None  # anti-downgrade floor: the highest version an update ever committed

    def to_json(self) -> dict[str, Any]:
        return {"active": self.active, "history": list(self.history), "versions": dict(self.versions),
                "pending": _record_json(self.pending) if self.pending else None,
                "outcome": _record_json(self.outcome) if self.outcome else None, "floor": self.floor}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Journal:
        """Raises ValueError/TypeError/KeyError for a damaged journal (unknown state, missing field)."""
        pending = _record(Pending, data["pending"]) if data.get("pending") else None
        if pending is not None and pending.state.terminal:
            raise ValueError(f"work in flight is in the final state {pending.state.value!r}")
        outcome = data.get("outcome")
        versions = dict(data.get("versions") or {})
        # A journal older than the floor: the highest version it keeps is the safest floor it knows.
        floor = data["floor"] if "floor" in data else highest_version(*versions.values())
        if floor is not None:
            parse_version(floor)
        return cls(active=data.get("active"), history=tuple(data.get("history") or ()), versions=versions,
                   pending=pending, outcome=_record(Outcome, outcome) if outcome else None, floor=floor)

    @property
    def kept(self) -> frozenset[str]:
        """The committed slots on disk: the active one and its history."""
        return frozenset(s for s in (self.active, *self.history) if s)

    # -- transitions (pure) ---------------------------------------------------------------------
    def with_pending(self, pending: Pending | None) -> Journal:
        return replace(self, pending=pending)

    def step(self, state: OtaState, **changes: Any) -> Journal:
        """The work in flight moves to ``state`` (with ``changes`` to its other fields).

        Raises:
            RuntimeError: nothing is in flight, or the move is not in the transition table.
        """
        if self.pending is None:
            raise RuntimeError(f"cannot move to {state.value!r}: nothing in flight")
        check_transition(self.pending.state, state)
        return replace(self, pending=replace(self.pending, state=state, **changes))

    def _check_end(self, state: OtaState) -> None:
        # A rejection refused before anything was queued has no pending state to move from.
        if self.pending is not None:
            check_transition(self.pending.state, state)

    def committed(self, slot: str, version: str, keep: int, outcome: Outcome) -> Journal:
        """``slot`` becomes active; the old active goes first in history; keep at most ``keep`` slots.

        An update raises the anti-downgrade floor to its version; a rollback never lowers it.

        Raises:
            RuntimeError: the work in flight may not move to ``outcome.state`` from where it is.
        """
        self._check_end(outcome.state)
        history = [s for s in ((self.active,) + self.history) if s and s != slot]
        history = history[: max(keep - 1, 1)]
        kept = {slot, *history}
        versions = {s: v for s, v in {**self.versions, slot: version}.items() if s in kept}
        floor = self.floor if outcome.rollback else highest_version(self.floor, version)
        return Journal(active=slot, history=tuple(history), versions=versions, pending=None, outcome=outcome,
                       floor=floor)

    def demoted(self, outcome: Outcome) -> Journal:
        """The active slot hung after its commit: the previous kept slot becomes active.

        The hung slot leaves the journal (so no boot, fallback or rollback command serves it again,
        and the next boot deletes it); the floor stays, so its signed update cannot be replayed.
        What is in flight is left as it is.

        Raises:
            RuntimeError: there is no previous kept slot.
        """
        if not self.history:
            raise RuntimeError("cannot give up the active slot: no previous slot is kept")
        active, history = self.history[0], self.history[1:]
        versions = {s: v for s, v in self.versions.items() if s in (active, *history)}
        return replace(self, active=active, history=history, versions=versions, outcome=outcome)

    def finished(self, outcome: Outcome) -> Journal:
        """The in-flight work ended without changing what is committed.

        Raises:
            RuntimeError: the work in flight may not move to ``outcome.state`` from where it is.
        """
        self._check_end(outcome.state)
        return replace(self, pending=None, outcome=outcome)

    def slot_for_version(self, version_key: tuple[int, ...] | None, parse: Any) -> str | None:
        """The kept history slot with that version (None = the most recent previous one)."""
        if version_key is None:
            return self.history[0] if self.history else None
        for slot in self.history:
            if parse(self.versions.get(slot, "0")) == version_key:
                return slot
        return None


class SlotStore:
    """File I/O for the journal, the slots and the staging area, confined to ``state_dir``."""

    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir).resolve()
        self.slots = self.root / "slots"
        self.staging = self.root / "staging"
        for d in (self.root, self.slots, self.staging):
            d.mkdir(parents=True, exist_ok=True)
        self.journal_path = self.root / JOURNAL_NAME

    def _inside(self, base: Path, name: str) -> Path:
        if not is_plain_file_name(name):
            raise ConfigError(f"{name!r} is not a plain name; refusing a path outside {base}")
        path = (base / name).resolve()
        if path.parent != base:
            raise ConfigError(f"{name!r} escapes {base}")
        return path

    def slot_dir(self, slot: str) -> Path:
        return self._inside(self.slots, slot)

    def staging_dir(self, rollout_id: str) -> Path:
        return self._inside(self.staging, rollout_id)

    # -- journal --------------------------------------------------------------------------------
    def read_journal(self) -> Journal:
        """The persisted journal, or an empty one on first start.

        Raises:
            ConfigError: the journal exists but is unreadable (never silently start from scratch).
        """
        if not self.journal_path.exists():
            return Journal()
        try:
            return Journal.from_json(json.loads(self.journal_path.read_text(encoding="utf-8")))
        except (ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"{self.journal_path}: unreadable OTA journal ({exc})") from exc

    def write_journal(self, journal: Journal) -> None:
        """Raises StorageError when the journal cannot be written (full disk, I/O error)."""
        try:
            atomic_write_json(self.journal_path, journal.to_json())
        except OSError as exc:
            raise StorageError(f"cannot write the OTA journal: {exc.strerror or exc}") from exc

    def set_aside_journal(self) -> Path:
        """Copy a damaged journal aside (for a post-mortem) and return where it went.

        A copy, not a move: until the rebuilt journal replaces it, a crash must find the damaged
        one again (and rebuild again), never an empty state dir that would look like a first start.
        """
        aside = self.root / f"{JOURNAL_NAME}.damaged"
        atomic_write_bytes(aside, self.journal_path.read_bytes())
        return aside

    # -- slots ----------------------------------------------------------------------------------
    def install(self, slot: str, model_file: Path, raw_manifest: dict[str, Any] | None,
                signature: str | None, crash: Any = None, move: bool = False) -> Path:
        """Put a verified model into a fresh slot; every file is written atomically and fsynced.

        ``move=True`` renames the staged file into the slot (same file system): no second copy,
        so the free-space check made before the download stays true. The slot is complete only
        when renamed into place; a crash before that leaves an orphan :meth:`prune` deletes.

        Raises:
            StorageError: the disk is full or failed.
        """
        try:
            return self._install(slot, Path(model_file), raw_manifest, signature, crash, move)
        except OSError as exc:
            raise StorageError(f"cannot install the model: {exc.strerror or exc}") from exc

    def _install(self, slot: str, model_file: Path, raw_manifest: dict[str, Any] | None,
                 signature: str | None, crash: Any, move: bool) -> Path:
        target = self.slot_dir(slot)
        if target.exists():
            shutil.rmtree(target)
        tmp = self._inside(self.slots, f"{slot}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        if move:
            os.replace(model_file, tmp / MODEL_NAME)
            if crash:
                crash("slot-moved")  # the staged file is in the half-built slot, staging has none
        else:
            shutil.copyfile(model_file, tmp / MODEL_NAME)
        with open(tmp / MODEL_NAME, "rb+") as fh:
            os.fsync(fh.fileno())
        if crash:
            crash("slot-partial")  # the model is in, the manifest not yet
        if raw_manifest is not None:
            atomic_write_json(tmp / MANIFEST_NAME, raw_manifest)
        if signature:
            atomic_write_bytes(tmp / SIGNATURE_NAME, (signature + "\n").encode("ascii"))
        fsync_dir(tmp)
        os.replace(tmp, target)
        fsync_dir(self.slots)
        return target

    def model_path(self, slot: str) -> Path:
        return self.slot_dir(slot) / MODEL_NAME

    def remove_slot(self, slot: str) -> None:
        path = self.slot_dir(slot)
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)

    def prune(self, keep: AbstractSet[str], keep_staging: AbstractSet[str] = frozenset()) -> list[str]:
        """Delete slot and staging directories that nothing references (leftovers of a crash)."""
        removed = []
        for base, keepers in ((self.slots, keep), (self.staging, keep_staging)):
            for entry in base.iterdir():
                if entry.name not in keepers:
                    shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
                    removed.append(entry.name)
        return removed
