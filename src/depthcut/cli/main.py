"""The `depthcut` command line: parsing (torch is not imported until a command runs), logging, and
the exit codes: 0 done, 2 an error explained in one line, 128+N stopped by signal N."""

from __future__ import annotations

import argparse
import difflib
import errno
import os
import re
import signal
import sys

from depthcut import __version__
from depthcut.cli.commands import COMMANDS
from depthcut.errors import DepthcutError
from depthcut.io.claims import release_claims
from depthcut.io.signals import handle_signals
from depthcut.logs import configure as configure_logging
from depthcut.pipeline.options import add_config_arguments, config_from_args
from depthcut.pipeline.preflight import check_before_loading

# argparse's message for a value outside the choices (3.11 quotes each choice; 3.12.8+ does not)
INVALID_CHOICE = re.compile(r"invalid choice: '?(?P<given>[^'()]*?)'? \(choose from (?P<choices>.*)\)")


class _Parser(argparse.ArgumentParser):
    """argparse, with a mistake on the command line (an unknown choice, a value that is not a finite
    number) reported like every other: one `depthcut: error:` line, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"depthcut: error: {with_suggestion(message)} (see {self.prog} --help)\n")


def with_suggestion(message: str) -> str:
    """argparse's `message`, with "did you mean ...?" where it refuses a value close to one of its choices
    (`depthcut shirnk`: shrink; `--repair lstq`: lstsq)."""
    refused = INVALID_CHOICE.search(message)
    if refused is None:
        return message
    choices = [choice.strip(" '\"") for choice in refused["choices"].split(",")]
    by_case = {choice.lower(): choice for choice in choices}
    close = difflib.get_close_matches(refused["given"].lower(), list(by_case), n=1, cutoff=0.6)
    return f"{message}; did you mean {by_case[close[0]]!r}?" if close else message


def build_parser() -> argparse.ArgumentParser:
    """One subcommand per command, its options built from the command's config (depthcut.pipeline)."""
    parser = _Parser(
        prog="depthcut",
        description="Depth pruning of decoder LLMs: find the most redundant layers and remove them. "
                    "Layer numbers are 0-based; blocks are half-open.",
    )
    parser.add_argument("--version", action="version", version=f"depthcut {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error that depthcut does not explain itself")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more messages: -v adds depthcut's debug messages, -vv those of the libraries it uses")
    parser.add_argument("-q", "--quiet", dest="log_quiet", action="store_true",
                        help="only warnings and errors (a command's own --quiet hides its progress bars)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, config_class, run, summary, description, epilog in COMMANDS:
        command = sub.add_parser(name, help=summary, description=description, epilog=epilog,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        add_config_arguments(command, config_class)
        command.set_defaults(run=run, config_class=config_class)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, --version, or a mistake already reported
        return done.code if isinstance(done.code, int) else 2
    configure_logging(args.verbose, args.log_quiet)
    try:
        with handle_signals():  # SIGTERM and SIGHUP clean up as Ctrl-C does
            try:
                config = config_from_args(args.config_class, args)
                check_before_loading(config)  # in milliseconds, before the pipeline's imports and the model load
                args.run(config)
            finally:
                release_claims()
    except DepthcutError as error:
        print(f"depthcut: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        signum = getattr(interrupt, "signum", signal.SIGINT)
        how = "interrupted" if signum == signal.SIGINT else f"terminated by {signal.Signals(signum).name}"
        print(f"depthcut: {how}; unfinished output was removed", file=sys.stderr)
        return 128 + signum
    except Exception as error:  # noqa: BLE001 (the last net: one line, unless --debug asks for the traceback)
        if args.debug:
            raise
        print(f"depthcut: error: {_unexplained(error, args.command)}", file=sys.stderr)
        return 2
    return 0


def _unexplained(error: Exception, command: str) -> str:
    """One line for an error that no check of depthcut's caught: what failed, and where (the file it
    concerns when the error names one). The unfinished output is removed either way."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        where = f" ({error.filename})" if error.filename else ""
        return (f"{os.strerror(error.errno).lower()}{where}; the command stopped and removed its unfinished "
                "output")
    text = str(error).splitlines()[0][:300] if str(error) else ""
    where = f" ({error.filename})" if isinstance(error, OSError) and error.filename else ""
    return (f"{command} failed: {type(error).__name__}: {text}{where}; the unfinished output was removed "
            "(an input depthcut does not check, or a bug: run with --debug for the traceback)")
