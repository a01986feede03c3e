"""Install the model named in agent.yaml as the first committed one, without probation.

It is the operator's own configuration, so there is no floor and no probation; but its hash is
still checked against its manifest, and its signature when there is one, before it serves.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.ota.commands import UpdateRequest
from agent.ota.slots import Outcome, slot_name
from edgefleet.errors import ArtifactError
from edgefleet.manifest import check_model_file, load_manifest, sha256_file
from edgefleet.messages import OtaState

if TYPE_CHECKING:
    from agent.ota.manager import OtaManager

__all__ = ["install_initial"]


def install_initial(ota: OtaManager, path: Path) -> Any:
    """Install ``path`` (artifact dir or bare .tflite) as the committed model and serve it.

    The caller has checked that nothing is committed yet; a resumed update stays in flight.

    Raises:
        ArtifactError / ModelError: the file is missing, does not match its manifest or cannot load.
        StorageError: the disk is full or failed.
    """
    ledger = ota._ledger
    with ledger.lock:
        if path.is_dir():
            manifest, raw, sig = load_manifest(path)
            if sig is not None:
                ota._check_manifest(UpdateRequest("initial", manifest, raw, sig, path.as_uri()), floor=False)
            model = path / manifest.model.file
            if not model.is_file():
                raise ArtifactError(f"{path}: manifest names {manifest.model.file}, which is missing")
            check_model_file(model, manifest.model, manifest.model.file)
            name, version, sha = manifest.name, manifest.version, manifest.model.sha256
        elif path.is_file():
            manifest, raw, sig, model = None, None, None, path
            name, version, sha = (path.stem or "model"), "0", sha256_file(path)
        else:
            raise ArtifactError(f"{path}: no such model file or artifact directory")
        safe = "".join(c if c.isalnum() or c in "_.-" else "_" for c in name)[:64] or "model"
        slot = slot_name(safe, version, sha)
        ota.store.install(slot, model, raw, sig)
        info = ota.host.activate(ota.store.model_path(slot), manifest, name=safe)
        # Not a move of the work in flight: a resumed update (if any) stays where it is.
        outcome = Outcome("initial", version, OtaState.COMMITTED, reported=True)
        j = ledger.journal
        ledger.persist(j.with_pending(None).committed(slot, version, ota.keep_versions, outcome)
                       .with_pending(j.pending))
    return info
