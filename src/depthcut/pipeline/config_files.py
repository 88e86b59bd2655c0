"""Config files and replay (docs/config-files.md): `depthcut shrink --config recipe.yaml` reads a
mapping of the command's settings (YAML or JSON) into its parser's defaults, so that the flags given
on the command line override the file; `depthcut replay OUT` reads the settings a run recorded in its
depthcut.json (`depthcut.io.invocation`) the same way.

A file's value goes through the option's own parser (a list becomes the comma list `--repairs a,b`
reads, a number the text `--seq-len` reads), so a file and the flags give the same config and refuse
the same mistakes. Nothing here imports torch: the command line is parsed without it.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
from pathlib import Path

from depthcut.errors import DepthcutError
from depthcut.io.invocation import INVOCATION_SCHEMA

CONFIG_DEST = "config_file"  # the parser's name for --config: not a setting of any command
PROVENANCE_FILE = "depthcut.json"
ANALYSIS_FILE = "analysis.json"


def settings_of(config) -> dict:
    """Every command-line setting of `config` as JSON values (tuples as lists), as a run records it."""
    return {field.name: _json_value(getattr(config, field.name)) for field in dataclasses.fields(config)
            if field.init and "help" in field.metadata}


def _json_value(value):
    return [_json_value(item) for item in value] if isinstance(value, tuple | list) else value


def read_config_file(path: str | Path) -> dict:
    """The mapping in a .yaml/.yml or .json file (another suffix: JSON, else YAML), or one line why not."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DepthcutError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DepthcutError(f"config file {path} cannot be read: {error}") from None
    as_yaml = path.suffix.lower() in (".yaml", ".yml")
    try:
        loaded = _load_yaml(text, path) if as_yaml else json.loads(text)
    except json.JSONDecodeError as error:
        if path.suffix.lower() == ".json":
            raise DepthcutError(f"config file {path} is not valid JSON: {error}") from None
        loaded = _load_yaml(text, path)
    if not isinstance(loaded, dict):
        raise DepthcutError(f"config file {path} holds a {type(loaded).__name__}, not a mapping of settings "
                            "(e.g. `seq_len: 128`)")
    return loaded


def _load_yaml(text: str, path: Path):
    try:
        # deferred: PyYAML is optional (JSON needs nothing), and a JSON file never imports it
        import yaml
    except ImportError:
        raise DepthcutError(f"config file {path}: reading YAML needs PyYAML (pip install pyyaml); or write the "
                            "settings as JSON") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        at = f" (line {where.line + 1})" if where is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise DepthcutError(f"config file {path} is not valid YAML{at}: {problem}") from None


def recorded_invocation(record: dict, source: str) -> dict | None:
    """The invocation a depthcut.json (or an analysis.json, an eval's results) records; None when
    `record` is a plain config file. A record without one, or of another major schema, is refused."""
    environment = record.get("environment")
    if environment is None and isinstance(record.get("metadata"), dict):  # analysis.json keeps it there
        environment = record["metadata"].get("environment")
    if not isinstance(environment, dict):
        return None
    invocation = environment.get("invocation")
    if not isinstance(invocation, dict):
        raise DepthcutError(f"{source} records no command to replay (written by the Python API, or by a "
                            f"depthcut older than the replay record: {environment.get('depthcut', '?')})")
    schema = str(invocation.get("schema", ""))
    if _major(schema) != _major(INVOCATION_SCHEMA):
        raise DepthcutError(f"{source} records its command as {schema or 'an unknown schema'}; this depthcut "
                            f"replays {INVOCATION_SCHEMA} (use the depthcut {environment.get('depthcut', '?')} "
                            "that wrote it)")
    if not isinstance(invocation.get("command"), str) or not isinstance(invocation.get("settings"), dict):
        raise DepthcutError(f"{source}: its invocation record lacks the command or its settings")
    return invocation


def _major(schema: str) -> str:
    """`depthcut.invocation/1.2` -> `depthcut.invocation/1`: a minor version only adds keys."""
    name, _, version = schema.partition("/")
    return f"{name}/{version.split('.')[0]}"


def replay_source(path: str | Path) -> Path:
    """The file that records a run: an output folder's depthcut.json (an analysis folder's
    analysis.json), or the file named (an eval's results)."""
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        raise DepthcutError(f"{path}: replay reads a JSON record; a GGUF keeps its record in the "
                            "depthcut.provenance metadata key, which replay does not read yet")
    if not path.is_dir():
        return path
    for name in (PROVENANCE_FILE, ANALYSIS_FILE):
        if (path / name).is_file():
            return path / name
    raise DepthcutError(f"{path} holds no {PROVENANCE_FILE} or {ANALYSIS_FILE} to replay")


def setting_name(key) -> str:
    """`seq-len`, `--seq-len` and `seq_len` all name the field seq_len."""
    return str(key).lstrip("-").replace("-", "_")


def apply_settings(parser: argparse.ArgumentParser, command: str, settings: dict, source: str) -> None:
    """Make each of `settings` (field name -> value) the default of its option in `parser` (one
    command's), parsed as the command line parses it; an option the settings give is no longer required
    (a positional MODEL becomes optional). Refuses an unknown key with the closest known one."""
    actions = {action.dest: action for action in parser._actions  # argparse lists its options only here
               if action.dest not in ("help", CONFIG_DEST) and action.default is not argparse.SUPPRESS}
    values = {}
    for key, value in settings.items():
        name = setting_name(key)
        if name not in actions:
            close = difflib.get_close_matches(name, list(actions), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else f" (its settings: {', '.join(sorted(actions))})"
            raise DepthcutError(f"{source}: {key!r} is not a setting of depthcut {command}{hint}")
        if name in values:
            raise DepthcutError(f"{source}: {name} is given twice (as {name} and {name.replace('_', '-')})")
        values[name] = _parsed(actions[name], value, f"{source}: {key}")
    for name, value in values.items():
        action = actions[name]
        action.default = value
        action.required = False
        if not action.option_strings:  # a positional: the file gives it, the command line may still
            action.nargs = "*" if action.nargs in ("+", "*") else "?"


def drop_replaced_alternatives(parser: argparse.ArgumentParser, settings: dict, argv: list[str]) -> dict:
    """`settings` without those an option given in `argv` replaces: `--drop 2` on the command line
    overrides a file's `fraction` as well as its `drop` (one of a mutually exclusive set)."""
    def given(action):
        return any(token == flag or token.startswith(flag + "=") for token in argv for flag in action.option_strings)

    replaced = set()
    for group in parser._mutually_exclusive_groups:  # argparse keeps the sets only here
        if any(given(action) for action in group._group_actions):
            replaced |= {action.dest for action in group._group_actions if not given(action)}
    return {key: value for key, value in settings.items() if setting_name(key) not in replaced}


def _parsed(action: argparse.Action, value, where: str):
    """`value` from a file as the command line would read it for `action`."""
    shown = f"--{action.dest.replace('_', '-')}" if action.option_strings else action.dest.upper()
    if action.nargs == 0:  # a flag: true or false
        if not isinstance(value, bool):
            raise DepthcutError(f"{where}: {shown} is a flag: true or false, not {value!r}")
        return value
    if value is None:
        if action.default is None:
            return None
        raise DepthcutError(f"{where}: {shown} needs a value (null is not one)")
    if isinstance(value, bool | dict):
        raise DepthcutError(f"{where}: {value!r} is not a value of {shown}")
    parse = action.type or str
    try:
        if action.nargs in ("+", "*"):  # several values, each one word of the command line
            items = value if isinstance(value, list) else [value]
            parsed = [parse(_text(item, where, shown)) for item in items]
        elif isinstance(value, list):
            parsed = parse(",".join(_text(item, where, shown) for item in value))
        else:
            parsed = parse(_text(value, where, shown))
    except (argparse.ArgumentTypeError, ValueError, TypeError, DepthcutError) as error:
        raise DepthcutError(f"{where}: {error}") from None
    if action.choices is not None and parsed not in action.choices:
        choices = [str(choice) for choice in action.choices]
        close = difflib.get_close_matches(str(parsed), choices, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise DepthcutError(f"{where}: {parsed!r} is not one of {shown}'s choices ({', '.join(choices)}){hint}")
    return parsed


def _text(value, where: str, shown: str) -> str:
    """A scalar as the command line spells it (a float by repr, which reads back to the same number)."""
    if isinstance(value, bool | dict | list) or value is None:
        raise DepthcutError(f"{where}: {value!r} is not a value of {shown}")
    return repr(value) if isinstance(value, float) else str(value)
