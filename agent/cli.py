"""``edge-agent``: the on-device program.

Subcommands import their implementation lazily, so ``edge-agent validate`` starts fast and
``edge-agent --help`` never loads a runtime.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from edgefleet.cli import add_common_options, run_main
from edgefleet.errors import ExitCode

__all__ = ["build_parser", "main"]

# subcommand -> "module:function"; each function takes the parsed args and returns an exit code.
HANDLERS = {
    "run": "agent.service:cmd_run",
    "infer": "agent.engine_cli:cmd_infer",
    "validate": "agent.engine_cli:cmd_validate",
    "bench": "agent.engine_cli:cmd_bench",
    "profile": "agent.cli:cmd_profile",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent", description=__doc__.splitlines()[0])
    add_common_options(parser, exit_codes={ExitCode.FAILED: "validate: the model does not load or run"})
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the device service until SIGTERM/SIGINT")
    run.add_argument("--config", required=True, help="agent.yaml")

    infer = sub.add_parser("infer", help="run one inference on a .npy input")
    infer.add_argument("--model", required=True, help="model .tflite or artifact directory")
    infer.add_argument("--input", required=True, help=".npy input (one sample or a batch)")
    infer.add_argument("--output", help="write the result to this .npy file")
    infer.add_argument("--profile", default=None, help="device profile name or path")
    infer.add_argument("--json", action="store_true", help="print the result as JSON")

    validate = sub.add_parser("validate", help="check in a child process that a model loads and runs")
    validate.add_argument("--model", required=True, help="model .tflite or artifact directory")
    validate.add_argument("--profile", default=None, help="device profile name or path")
    validate.add_argument("--json", action="store_true", help="print the report as JSON")

    bench = sub.add_parser("bench", help="measure latency and cache savings on this device")
    bench.add_argument("--model", required=True, help="model .tflite or artifact directory")
    src = bench.add_mutually_exclusive_group()
    src.add_argument("--input", help=".npy input repeated")
    src.add_argument("--stream", help=".npy array of frames, inferred in order")
    bench.add_argument("--cache", choices=("on", "off"), default="off")
    bench.add_argument("--profile", default=None, help="device profile name or path")
    bench.add_argument("--iterations", type=int, default=200)
    bench.add_argument("--json", action="store_true")

    prof = sub.add_parser("profile", help="validate a device profile and print its summary")
    prof.add_argument("profile", help="profile name or path")
    for p in (run, infer, validate, bench, prof):
        add_common_options(p, subcommand=True)
    return parser


def cmd_profile(args: argparse.Namespace) -> int:
    from edgefleet.profiles import load_profile

    print(load_profile(args.profile).summary())
    return 0


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    module_name, func_name = HANDLERS[args.command].split(":")
    handler = getattr(importlib.import_module(module_name), func_name)
    return int(handler(args))


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
