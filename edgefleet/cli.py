"""What the three programs share on the command line: options, logging, errors and exit codes.

* :func:`add_common_options` gives a parser ``--version``, ``--debug`` and ``--log-level`` and
  an epilog listing the exit codes, so the three programs spell them the same way.
* :func:`run_main` sets up logging and turns every failure into one ``error:`` line and the exit
  code of :class:`edgefleet.errors.ExitCode` that its exception class names.

Logging goes to stderr. Under journald (systemd sets ``JOURNAL_STREAM`` to stderr's device and
inode) each line starts with its syslog priority (``<3>`` error ... ``<7>`` debug, the
sd-daemon convention) so ``journalctl -p warning`` filters, and carries no timestamp: the
journal stamps every line itself. Anywhere else lines carry a timestamp and no prefix.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

from edgefleet import __version__
from edgefleet.errors import ConfigError, EdgefleetError, ExitCode

__all__ = [
    "LOG_LEVELS",
    "add_common_options",
    "configure_logging",
    "exit_codes_epilog",
    "run_main",
    "under_journald",
    "wants_debug",
]

LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
              "error": logging.ERROR}
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(levelname)s %(name)s: %(message)s"

# Every program means the same by these; add_common_options lists them with each program's own words.
_EXIT_MEANINGS: dict[int, str] = {
    ExitCode.OK: "success",
    ExitCode.USAGE: "bad arguments, configuration, input or artifact (one error: line; retrying cannot help)",
    ExitCode.TRANSPORT: "could not reach the MQTT broker or a server (retrying later may help)",
    ExitCode.BUG: "unexpected internal error (--debug shows the traceback)",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C)",
}


def wants_debug(argv: Sequence[str]) -> bool:
    return "--debug" in argv


def _lower(text: str) -> str:
    return text.lower()


def exit_codes_epilog(meanings: Mapping[int, str]) -> str:
    """The "exit codes:" block of ``--help``: the shared meanings plus this program's own."""
    merged = {**_EXIT_MEANINGS, **meanings}
    lines = [f"  {code:>3}  {merged[code]}" for code in sorted(merged)]
    return "exit codes:\n" + "\n".join(lines)


def add_common_options(parser: argparse.ArgumentParser, *, exit_codes: Mapping[int, str] | None = None,
                       subcommand: bool = False, debug_help: str = "show tracebacks and debug logs",
                       value_hint: str | None = None) -> None:
    """Give ``parser`` ``--version``, ``--debug`` and ``--log-level`` and the exit-code epilog.

    ``subcommand=True`` (each subparser) accepts ``--debug``/``--log-level`` after the command
    too, hidden from its help and without overriding what was given before the command.
    ``exit_codes`` adds this program's own codes (1, 3, ...) to the shared ones. ``value_hint``:
    ``--version VALUE`` is refused with this hint (an option renamed away from ``--version``).
    """
    if subcommand:
        parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        parser.add_argument("--log-level", type=_lower, choices=list(LOG_LEVELS), metavar="LEVEL",
                            default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return
    version = f"{parser.prog} {__version__}"
    if value_hint is None:
        parser.add_argument("--version", action="version", version=version, help="print the version and exit")
    else:
        parser.add_argument("--version", action=_VersionAction, nargs="?", version=version,
                            hint=value_hint, help="print the version and exit")
    parser.add_argument("--debug", action="store_true", help=debug_help)
    parser.add_argument("--log-level", type=_lower, choices=list(LOG_LEVELS), metavar="LEVEL", default=None,
                        help="debug, info, warning or error (default: info under systemd's journal, else "
                             "warning; --debug: debug)")
    parser.epilog = exit_codes_epilog(exit_codes or {})
    parser.formatter_class = _HelpFormatter


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the exit-code epilog's lines; shows a value-refusing ``--version`` as plain ``--version``."""

    def _format_args(self, action: argparse.Action, default_metavar: str) -> str:
        return "" if isinstance(action, _VersionAction) else super()._format_args(action, default_metavar)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if isinstance(action, _VersionAction):
            return ", ".join(action.option_strings)
        return super()._format_action_invocation(action)

    def _format_usage(self, *args: Any, **kwargs: Any) -> str:
        return super()._format_usage(*args, **kwargs).replace("[--version ]", "[--version]")


class _VersionAction(argparse.Action):
    """``--version`` alone prints the version; ``--version VALUE`` is an old spelling, refused with a hint."""

    def __init__(self, option_strings: list[str], dest: str, version: str, hint: str, **kwargs: Any) -> None:
        super().__init__(option_strings, argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)
        self.version = version
        self.hint = hint

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if values is not None:
            raise ConfigError(f"--version takes no value, got {values!r}: {self.hint}")
        print(self.version)
        parser.exit()


def under_journald(stream: TextIO | None = None, environ: Mapping[str, str] | None = None) -> bool:
    """True when ``stream`` (stderr) is connected to the journal.

    systemd sets ``JOURNAL_STREAM=DEV:INODE`` of the stream it connected; comparing it with the
    stream itself keeps a child whose stderr was redirected (a pipe, a file) from dropping its
    timestamps. ``INVOCATION_ID`` alone is not enough: it is set under ``StandardError=file:`` too.
    """
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    if not value:
        return False
    try:
        st = os.fstat((sys.stderr if stream is None else stream).fileno())
    except (AttributeError, OSError, ValueError):  # pytest's capture, a closed stream
        return False
    return value == f"{st.st_dev}:{st.st_ino}"


class _JournalFormatter(logging.Formatter):
    """``<priority>`` before every line (a traceback's too, so it keeps the record's priority)."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def _priority(levelno: int) -> int:
    """syslog priority of a logging level: 2 crit, 3 err, 4 warning, 6 info, 7 debug."""
    for floor, priority in ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
                            (logging.INFO, 6)):
        if levelno >= floor:
            return priority
    return 7


_HANDLER_NAME = "edgefleet-cli"


def configure_logging(level: str | None = None, *, debug: bool = False, stream: TextIO | None = None) -> None:
    """One stderr handler on the root logger, in the journal's format when stderr is the journal.

    Leaves logging alone when someone else (an embedding program, pytest) has configured it.
    """
    out = sys.stderr if stream is None else stream
    journal = under_journald(out)
    name = level or ("debug" if debug else "info" if journal else "warning")
    root = logging.getLogger()
    ours = [h for h in root.handlers if h.get_name() == _HANDLER_NAME]
    if root.handlers and not ours:
        return
    for old in ours:
        root.removeHandler(old)
    handler = logging.StreamHandler(out)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(_JournalFormatter(JOURNAL_FORMAT) if journal else logging.Formatter(PLAIN_FORMAT))
    root.addHandler(handler)
    root.setLevel(LOG_LEVELS.get(name, logging.WARNING))


def _log_level(argv: Sequence[str]) -> str | None:
    """The last ``--log-level X`` / ``--log-level=X`` (argparse checks the value later)."""
    found = None
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == "--log-level" and i + 1 < len(argv):
            found = argv[i + 1]
        elif arg.startswith("--log-level="):
            found = arg.partition("=")[2]
    return found.lower() if found and found.lower() in LOG_LEVELS else None


def _say(message: str) -> None:
    """The one ``error:`` line, as an error-priority line when stderr is the journal."""
    print(("<3>" if under_journald() else "") + message, file=sys.stderr)


def run_main(main: Callable[[list[str]], int], argv: Sequence[str] | None = None) -> int:
    """Run a CLI ``main`` and map failures to a one-line ``error:`` message and an exit code.

    Known errors exit with their ``exit_code`` (2, or 4 for :class:`TransportError`); Ctrl-C
    exits 130; anything unexpected exits 70. Tracebacks are shown only with ``--debug``.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = wants_debug(args)
    configure_logging(_log_level(args), debug=debug)
    try:
        return main(args)
    except EdgefleetError as exc:
        if debug:
            raise
        _say(f"error: {exc}")
        return int(exc.exit_code)
    except KeyboardInterrupt:
        _say("error: interrupted")
        return int(ExitCode.INTERRUPTED)
    except BrokenPipeError:
        return int(ExitCode.OK)
    except Exception as exc:  # a bug: keep it to one line unless asked
        if debug:
            raise
        _say(f"error: unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)")
        return int(ExitCode.BUG)
