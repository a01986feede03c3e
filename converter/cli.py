"""``edge-convert``: the command line around :func:`converter.convert`.

Exit codes: 0 deployable artifact written; 3 artifact written but NOT deployable (misses the
profile's fidelity target, or would not run on its accelerator); 2 bad input (one ``error:`` line);
70 a bug (one line, ``--debug`` for the traceback); the full list in ``--help``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from converter.options import PRUNE_ALLOCATIONS, ConvertOptions
from edgefleet.cli import add_common_options, run_main
from edgefleet.errors import ConfigError, ExitCode

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, through run_main, instead of usage + exit
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="edge-convert", description="Convert a trained Keras/TensorFlow model into a checked "
                "full-integer TFLite artifact for a device profile.")
    p.add_argument("model", nargs="?", help=".keras, .h5/.hdf5 file or SavedModel directory")
    p.add_argument("--profile", help="device profile name (see --list-profiles) or path to a .yaml")
    p.add_argument("--calibration", help="samples: .npz (x or one array per input, optional y), .npy, or an image folder")
    p.add_argument("--eval", dest="eval_data", help="held-out samples for the fidelity check (default: 20%% of --calibration)")
    p.add_argument("--input-range", help="float range the model expects, e.g. 0,1 or -1,1 (images are scaled to it)")
    p.add_argument("--signature", help="SavedModel signature to convert (default serving_default, or the only one)")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=1,D,...",
                   help="fix an input's dynamic dimensions, e.g. image=1,224,224,3 (repeat per input)")
    p.add_argument("--custom-objects", metavar="MODULE.py",
                   help="Python file defining the Keras model's custom layers/functions (also lets Lambda "
                        "layers' stored code run: only for files you trust)")
    p.add_argument("--prune-channels", type=float, default=0.0, metavar="FRACTION",
                   help="remove this fraction of the prunable filters (Keras models)")
    p.add_argument("--prune-allocation", choices=sorted(PRUNE_ALLOCATIONS), default="cost",
                   help="how the fraction is spread over layers: cost (default; more where a channel costs more "
                        "multiply-accumulates), uniform, or width")
    p.add_argument("--sparsity", type=float, default=0.0, metavar="FRACTION",
                   help="zero this fraction of each kernel's smallest weights (smaller compressed artifact)")
    p.add_argument("--finetune-epochs", type=int, default=3, metavar="N", help="distillation epochs after pruning")
    p.add_argument("--artifact-version", "--model-version", dest="artifact_version", default="1", metavar="V",
                   help="the artifact's version, dotted numbers (default 1)")
    p.add_argument("--name", help="artifact name (default: the model file name)")
    p.add_argument("--labels", help="class names, one per line, by output index (predict responses can show them)")
    p.add_argument("--expires-days", type=float, help="devices refuse the manifest this many days from now")
    p.add_argument("--fleet", help="the fleet the artifact is meant for: devices of another fleet refuse it")
    p.add_argument("--group", action="append", dest="groups", help="a group it is meant for (repeatable)")
    p.add_argument("--sign-key", help="Ed25519 PEM private key; writes manifest.json.sig")
    p.add_argument("--keep-tensor-names", action="store_true",
                   help="keep every tensor's debug name in model.tflite (by default only inputs, outputs and "
                        "float tensors keep theirs: smaller downloads)")
    p.add_argument("--out", help="artifact directory to create (or a previous artifact to replace)")
    p.add_argument("--list-profiles", action="store_true", help="print the shipped device profiles and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary line")
    p.add_argument("--json", action="store_true", help="print the report summary as JSON on stdout")
    add_common_options(p, debug_help="show tracebacks and TensorFlow's own logs",
                       value_hint="the artifact's version is --artifact-version V",
                       exit_codes={ExitCode.NOT_DEPLOYABLE: "artifact written but NOT deployable (misses the "
                                   "profile's fidelity target, or would not run on its accelerator)"})
    return p


def _options(args: argparse.Namespace) -> ConvertOptions:
    """The flags as validated options (fractions, version, name, ... are checked here, before TensorFlow)."""
    from converter.data import parse_range
    from converter.options import parse_input_shape

    return ConvertOptions(version=args.artifact_version, name=args.name, input_range=parse_range(args.input_range),
                          signature=args.signature,
                          input_shapes=tuple(parse_input_shape(text) for text in args.input_shape),
                          custom_objects=Path(args.custom_objects) if args.custom_objects else None,
                          prune_channels=args.prune_channels, prune_allocation=args.prune_allocation,
                          sparsity=args.sparsity, finetune_epochs=args.finetune_epochs,
                          keep_tensor_names=args.keep_tensor_names,
                          sign_key=Path(args.sign_key) if args.sign_key else None, progress=not args.quiet,
                          labels=_read_labels(args.labels) if args.labels else None,
                          expires=_expiry(args.expires_days), fleet=args.fleet,
                          groups=tuple(args.groups) if args.groups else None)


def _read_labels(path: str) -> tuple[str, ...]:
    """One class name per line (trailing blank lines ignored).

    Raises:
        ConfigError: the file cannot be read as UTF-8 text.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--labels {path}: cannot read it as UTF-8 text ({exc})") from exc
    while lines and not lines[-1].strip():
        lines.pop()
    return tuple(line.strip() for line in lines)


def _expiry(days: float | None) -> str | None:
    if days is None:
        return None
    if not 0 < days <= 3650:
        raise ConfigError(f"--expires-days {days}: expected more than 0 and at most 3650")
    when = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=days)
    return when.isoformat(timespec="seconds").replace("+00:00", "Z")


def _glue_ranges(argv: list[str]) -> list[str]:
    """``--input-range -1,1`` as ``--input-range=-1,1``: argparse takes "-1,1" for a flag."""
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg == "--input-range" and out[i + 1].startswith("-"):
            out[i:i + 2] = [f"--input-range={out[i + 1]}", ""]
    return [a for a in out if a != ""]


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(_glue_ranges(argv))
    if args.list_profiles:
        from edgefleet.profiles import list_profiles
        for profile in list_profiles():
            print(profile.summary())
        return 0
    missing = [flag for flag, value in (("MODEL", args.model), ("--profile", args.profile),
                                        ("--calibration", args.calibration), ("--out", args.out)) if not value]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)} (see edge-convert --help)")
    from edgefleet.profiles import load_profile

    profile = load_profile(args.profile)  # fail on a bad profile or flag before paying for TensorFlow
    options = _options(args)
    from converter.pipeline import convert
    from converter.report import summary

    result = convert(args.model, profile, args.calibration, args.out, options, eval_data=args.eval_data)
    info = summary(result.report)
    if args.json:
        print(json.dumps(info, indent=2))
    elif not args.quiet:
        agreement = info["top1_agreement_pct"]
        print(f"{result.out_dir}: {info['name']} {info['version']} ({info['recipe']}, {info['size']} bytes, "
              f"float {info['float_size']} bytes"
              + (f", top-1 agreement {agreement:.2f}%" if agreement is not None else "") + ")")
    if not result.deployable:
        print("edge-convert: NOT deployable: " + "; ".join(result.reasons) + f" (see {result.out_dir}/report.md)",
              file=sys.stderr)
    return result.exit_code


def _silence_native_stderr() -> None:
    """Send TensorFlow's C++ logging (fd 2) to /dev/null, keep Python's sys.stderr on the terminal."""
    try:
        keep = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        sys.stderr = os.fdopen(keep, "w", buffering=1)
    except OSError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point. In-process callers (tests) pass ``argv`` and keep their stderr untouched."""
    if argv is None and "--debug" not in sys.argv[1:]:
        _silence_native_stderr()
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
