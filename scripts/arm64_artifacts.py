"""Host side of ``make test-arm64``: artifacts converted on x86 for every aarch64 device profile.

Trains the small digits CNN (scripts/sample_models.py), then runs the real ``edge-convert`` once per
shipped profile whose ``hardware.arch`` is ``aarch64``, into ``OUT/<profile>/``. The golden samples
in each manifest are the x86 host's own outputs; the emulated root validates them on ARM.

Reused when nothing that shapes them changed (a key over the converter, the contract, the profiles
and this script), so a second run does not need TensorFlow's minute per profile again.

    .venv/bin/python scripts/arm64_artifacts.py --out build/arm64/artifacts
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEY_SOURCES = ("converter", "edgefleet", "device_profiles", "scripts/sample_models.py",
               "scripts/arm64_artifacts.py", "pyproject.toml")


def source_key() -> str:
    digest = hashlib.sha256()
    for name in KEY_SOURCES:
        path = REPO / name
        files = sorted(p for p in path.rglob("*") if p.suffix in (".py", ".yaml", ".toml")) if path.is_dir() else [path]
        for file in files:
            if "__pycache__" in file.parts:
                continue
            digest.update(str(file.relative_to(REPO)).encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


def aarch64_profiles() -> list[str]:
    sys.path.insert(0, str(REPO))
    from edgefleet.profiles import list_profiles

    return [p.name for p in list_profiles() if p.hardware.arch == "aarch64"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--edge-convert", default=str(Path(sys.executable).with_name("edge-convert")))
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args(argv)
    out: Path = args.out
    profiles = aarch64_profiles()
    key = source_key()
    index_file = out / "index.json"
    if index_file.is_file():
        index = json.loads(index_file.read_text())
        if index.get("key") == key and index.get("profiles") == profiles and all(
                (out / p / "manifest.json").is_file() for p in profiles):
            print(f"arm64 artifacts: reused {len(profiles)} ({', '.join(profiles)}) from {out}")
            return 0
    out.mkdir(parents=True, exist_ok=True)
    index_file.unlink(missing_ok=True)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(REPO / "scripts"))
    from sample_models import train_digits_model, write_samples

    t0 = time.monotonic()
    model, x, y = train_digits_model(epochs=args.epochs)
    n_train = int(len(x) * 0.8)
    model_file = out / "digits.keras"
    model.save(model_file)
    calib = write_samples(out / "calib.npz", x[:n_train][:300], y[:n_train][:300])
    held_out = write_samples(out / "eval.npz", x[n_train:], y[n_train:])
    print(f"arm64 artifacts: trained the digits CNN on the host ({time.monotonic() - t0:.0f} s)")
    failed = []
    for name in profiles:
        t1 = time.monotonic()
        cmd = [args.edge_convert, str(model_file), "--profile", name, "--calibration", str(calib),
               "--eval", str(held_out), "--input-range", "0,1", "--name", "digits", "--out", str(out / name),
               "--quiet"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO)
        if proc.returncode != 0 or not (out / name / "manifest.json").is_file():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"arm64 artifacts: edge-convert --profile {name} failed (exit {proc.returncode}): {last}")
            failed.append(name)
            continue
        golden = json.loads((out / name / "manifest.json").read_text()).get("golden") or {}
        print(f"arm64 artifacts: {name}: converted on x86 ({time.monotonic() - t1:.0f} s), "
              f"{len(golden.get('samples', []))} golden samples, atol {golden.get('atol')}")
    if failed:
        return 1
    index_file.write_text(json.dumps({"key": key, "profiles": profiles}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
