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
import traceback
from pathlib import Path

from depthcut import __version__
from depthcut.cli.commands import COMMANDS
from depthcut.errors import DepthcutError
from depthcut.io.claims import release_claims
from depthcut.io.invocation import clear_invocation, record_invocation
from depthcut.io.signals import handle_signals
from depthcut.logs import configure as configure_logging
from depthcut.pipeline.config_files import (
    CONFIG_DEST,
    apply_settings,
    drop_replaced_alternatives,
    read_config_file,
    recorded_invocation,
    replay_source,
    settings_of,
)
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
    parser.commands = {}  # name -> its parser, whose defaults a --config file sets (parse_arguments)
    for name, config_class, run, summary, description, epilog in COMMANDS:
        command = sub.add_parser(name, help=summary, description=description, epilog=epilog,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        add_config_arguments(command, config_class)
        command.add_argument("--config", dest=CONFIG_DEST, metavar="FILE",
                             help="read the settings from a YAML or JSON file (or a depthcut.json, to rerun its "
                                  "command); the options given here override the file's (docs/config-files.md)")
        command.set_defaults(run=run, config_class=config_class)
        parser.commands[name] = command
    replay = sub.add_parser("replay", help="run a recorded command again with exactly its settings",
                            description="Run the command that made RUN (an output folder with depthcut.json, or "
                                        "an analysis.json or eval results file) with every setting it recorded.")
    replay.add_argument("run_record", metavar="RUN", help="an output folder, or the JSON file that records the run")
    replay.add_argument("--out", dest="replay_out", metavar="NEW",
                        help="where the rerun writes (required unless --force replaces the recorded output)")
    replay.add_argument("--force", dest="replay_force", action="store_true",
                        help="replace an existing output (the recorded one when no --out is given)")
    return parser


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """`argv` parsed with `parser` (from `build_parser`), a --config file's settings read in as the
    command's defaults (the flags given override them), and `replay RUN` turned into the command RUN
    recorded with its settings. A mistake in a file or record raises DepthcutError."""
    command = next((token for token in argv if not token.startswith("-")), None)
    config_file = _config_file(argv)
    if command in parser.commands and config_file is not None:
        settings = read_config_file(config_file)
        invocation = recorded_invocation(settings, config_file)
        if invocation is not None:  # a depthcut.json: the settings its command ran with
            if invocation["command"] != command:
                raise DepthcutError(f"{config_file} records a `depthcut {invocation['command']}`, not {command}: "
                                    f"run depthcut {invocation['command']} --config {config_file}, or replay it")
            # its --force is not carried over: the recorded output is replaced only where asked again
            settings = {**invocation["settings"], **({"force": False} if "force" in invocation["settings"] else {})}
        command_parser = parser.commands[command]
        apply_settings(command_parser, command, drop_replaced_alternatives(command_parser, settings, argv),
                       config_file)
    args = parser.parse_args(argv)
    if args.command != "replay":
        return args
    source = replay_source(args.run_record)
    invocation = recorded_invocation(read_config_file(source), str(source))
    if invocation is None:
        raise DepthcutError(f"{source} is not a depthcut record (no environment with the command it ran)")
    recorded = invocation["command"]
    if recorded not in parser.commands:
        raise DepthcutError(f"{source} records a command this depthcut does not have: {recorded}")
    settings = dict(invocation["settings"])
    if args.replay_out is None and not args.replay_force:
        raise DepthcutError(f"replay writes a new output: give --out NEW (or --force to replace the recorded "
                            f"{settings.get('out', 'output')})")
    if "out" in settings and args.replay_out is not None:
        settings["out"] = args.replay_out
    if "force" in settings:
        settings["force"] = args.replay_force
    apply_settings(parser.commands[recorded], recorded, settings, str(source))
    logging_flags = ["-v"] * args.verbose + ["--debug"] * args.debug + ["-q"] * args.log_quiet
    return parser.parse_args([*logging_flags, recorded])


def _config_file(argv: list[str]) -> str | None:
    """The FILE of the last `--config FILE` (or `--config=FILE`) in `argv`, as argparse would keep it."""
    found = None
    for index, token in enumerate(argv):
        if token == "--config" and index + 1 < len(argv):
            found = argv[index + 1]
        elif token.startswith("--config="):
            found = token.partition("=")[2]
    return found


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_arguments(build_parser(), argv)
    except SystemExit as done:  # --help, --version, or a mistake already reported
        return done.code if isinstance(done.code, int) else 2
    except DepthcutError as error:  # a config file or a replayed record that cannot be read
        print(f"depthcut: error: {error}", file=sys.stderr)
        return 2
    configure_logging(args.verbose, args.log_quiet)
    config = None
    try:
        with handle_signals():  # SIGTERM and SIGHUP clean up as Ctrl-C does
            try:
                config = config_from_args(args.config_class, args)
                record_invocation(args.command, argv, settings_of(config))  # for depthcut.json: replay
                check_before_loading(config)  # in milliseconds, before the pipeline's imports and the model load
                args.run(config)
            finally:
                clear_invocation()
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
        print(f"depthcut: error: {_unexplained(error, args.command, config)}", file=sys.stderr)
        return 2
    return 0


def _unexplained(error: Exception, command: str, config=None) -> str:
    """One line for an error that no check of depthcut's caught: what failed, what it was reading
    (the file the error concerns, else the command's inputs) and, for a KeyError, that a field it
    expected is missing. The unfinished output is removed either way."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        where = f" ({error.filename})" if error.filename else ""
        return (f"{os.strerror(error.errno).lower()}{where}; the command stopped and removed its unfinished "
                "output")
    text = str(error).splitlines()[0][:300] if str(error) else ""
    if isinstance(error, KeyError):
        text += " (a field it expected is missing)"
    read = being_read(error, config)
    reading = f" reading {read}" if read else ""
    return (f"{command} failed{reading}: {type(error).__name__}: {text}; the unfinished output was removed "
            "(an input depthcut does not check, or a bug: run with --debug for the traceback)")


# the names under which the code on an error's way holds the file it reads
_FILE_NAMES = ("filename", "path", "file", "config_file", "source", "folder", "location")
# the settings that name a command's inputs
_INPUTS = ("model", "analysis", "data", "results", "run", "sweep", "teacher", "baseline")


def being_read(error: BaseException, config=None) -> str:
    """What the command was reading when `error` was raised: the file an OSError names, else the
    innermost file held by the code the error passed through (its own source files aside), else the
    inputs the command's `config` names; "" where none is known."""
    if isinstance(error, OSError) and error.filename:
        return str(error.filename)
    for frame, _ in reversed(list(traceback.walk_tb(error.__traceback__))):
        for name in _FILE_NAMES:
            value = frame.f_locals.get(name)
            if isinstance(value, (str, Path)) and str(value) and not str(value).endswith(".py"):
                try:
                    if Path(value).exists():
                        return str(value)
                except (OSError, ValueError):
                    continue
    named = [str(value) for value in (getattr(config, name, None) for name in _INPUTS)
             if isinstance(value, (str, Path)) and value and Path(value).exists()]
    return f"its inputs ({', '.join(named)})" if named else ""
