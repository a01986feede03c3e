"""One place that turns errors into what a person sees on the command line."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence

from edgefleet.errors import EdgefleetError

__all__ = ["run_main", "wants_debug"]


def wants_debug(argv: Sequence[str]) -> bool:
    return "--debug" in argv


def run_main(main: Callable[[list[str]], int], argv: Sequence[str] | None = None) -> int:
    """Run a CLI ``main`` and map failures to a one-line ``error:`` message and an exit code.

    Known errors exit with their ``exit_code`` (2 by default); Ctrl-C exits 130; anything
    unexpected exits 1. Tracebacks are shown only with ``--debug``.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = wants_debug(args)
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return main(args)
    except EdgefleetError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # a bug: keep it to one line unless asked
        if debug:
            raise
        print(f"error: unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1
