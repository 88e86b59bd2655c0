"""The README's commands, as a user types them: its first screen's shell lines run on a tiny model from a
folder holding the project's `.venv` (as a fresh clone after `make test` does), every `depthcut ...` line
of the README and of docs/ parsed by the command line's own parser, and no shell line left waiting on a
dangling `\\`. So the README cannot drift from the command line again (issues 36 and 37)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
SHELL = {"bash", "sh", "shell", "console"}
MAX_README_LINES = 200
MAX_FIRST_SCREEN_LINES = 50
BUILT_IN = "smollm2-135m"
BUILT_IN_LAYERS = 30  # SmolLM2-135M's: the tiny stand-in has as many, so the README's --drop means the same
# Sizes that make the first screen's commands run in seconds on the tiny model (appended: the last
# occurrence of an option wins, and none of these is on the README's lines); shrink also gets a small
# corpus as its --data and its one --validate source.
# --search none: should the greedy search (tests/test_shrink_search.py) become the default, it costs minutes here.
TINY_SHRINK = ["--samples", "8", "--seq-len", "16", "--validation-windows", "4", "--dtype", "float32", "--quiet",
               "--search", "none"]
TINY_GENERATE = ["--max-new-tokens", "8"]


def fenced_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """(language, line number of the first line inside, lines) of every ``` block of `text`."""
    blocks, language, start, lines = [], None, 0, []
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            if language is None:
                language, start, lines = line[3:].strip(), number + 1, []
            else:
                blocks.append((language, start, lines))
                language = None
        elif language is not None:
            lines.append(line)
    assert language is None, "a ``` block is never closed"
    return blocks


def shell_commands(text: str) -> list[tuple[int, str]]:
    """(line number, command) of every command in the shell blocks of `text`: continuation lines (ending
    in `\\`) joined as the shell joins them."""
    commands = []
    for language, start, lines in fenced_blocks(text):
        if language not in SHELL:
            continue
        pending, first = "", 0
        for offset, line in enumerate(lines):
            if not pending:
                first = start + offset
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            command = (pending + line).strip()
            pending = ""
            if command and not command.startswith("#"):
                commands.append((first, command))
        if pending.strip():  # a dangling `\` at the block's end: the command as far as it goes
            commands.append((first, pending.strip()))
    return commands


def dangling_continuations(text: str) -> list[int]:
    """Line numbers of shell lines ending in `\\` with no command line after them in their block: pasted,
    such a command waits for more input."""
    dangling = []
    for language, start, lines in fenced_blocks(text):
        if language not in SHELL:
            continue
        for offset, line in enumerate(lines):
            following = lines[offset + 1] if offset + 1 < len(lines) else ""
            if line.endswith("\\") and not following.strip():
                dangling.append(start + offset)
    return dangling


def first_screen(text: str) -> str:
    """The README up to its first horizontal rule (`---`): what a visitor sees before scrolling."""
    lines = text.splitlines()
    assert "---" in lines, "the README's first screen ends at a `---` line"
    return "\n".join(lines[:lines.index("---")])


def words(command: str) -> list[str]:
    return shlex.split(command, comments=True)


def test_the_helpers_find_commands_and_dangling_backslashes():
    text = ("intro\n```bash\n# a comment\ndepthcut eval m --tasks a \\\n    --out x.json  # why\nls\n```\n"
            "```python\ndepthcut = 1\n```\n```bash\ndepthcut heal m --out h \\\n```\n")
    assert shell_commands(text) == [(4, "depthcut eval m --tasks a      --out x.json  # why"), (6, "ls"),
                                    (12, "depthcut heal m --out h")]
    assert words(shell_commands(text)[0][1]) == ["depthcut", "eval", "m", "--tasks", "a", "--out", "x.json"]
    assert dangling_continuations(text) == [12]
    assert first_screen("a\nb\n---\nc") == "a\nb"


def test_the_readme_is_short_and_its_first_screen_says_what_to_type_next():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_README_LINES, "the README is an index: details go to docs/"
    screen = first_screen(text)
    assert len(screen.splitlines()) <= MAX_FIRST_SCREEN_LINES
    typed = [command for _, command in shell_commands(screen)]
    # the set-up, then the three lines a user types next, in this order
    expected = ["make demo", "make test", "source .venv/bin/activate", "depthcut shrink", "depthcut generate"]
    positions = [next((i for i, c in enumerate(typed) if c.startswith(e)), None) for e in expected]
    assert None not in positions and positions == sorted(positions), typed
    shrink = words(typed[positions[3]])
    generate = words(typed[positions[4]])
    assert BUILT_IN in shrink, "the first screen shrinks the built-in model, which needs no download"
    assert generate[2] == shrink[shrink.index("--out") + 1], "generate runs the model shrink wrote"
    # the output a user should expect is shown, as a text block after the commands
    outputs = [lines for language, _, lines in fenced_blocks(screen) if language == "text"]
    assert any(f"> {generate[3]}" in lines for lines in outputs), "the expected output of generate is shown"


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_no_shell_command_ends_in_a_dangling_backslash(page):
    assert dangling_continuations(page.read_text(encoding="utf-8")) == []


def depthcut_commands():
    for page in [README, *DOCS]:
        for number, command in shell_commands(page.read_text(encoding="utf-8")):
            argv = words(command)
            if argv and Path(argv[0]).name == "depthcut":
                yield pytest.param(argv[1:], id=f"{page.name}:{number}")


@pytest.mark.parametrize("argv", list(depthcut_commands()))
def test_every_depthcut_command_in_the_docs_parses(argv, capsys):
    """Each command's options exist and take the values given (the parser and the config it builds, as
    `depthcut` does before running anything)."""
    from depthcut.cli.main import build_parser
    from depthcut.pipeline.options import config_from_args

    parser = build_parser()
    if "--help" in argv or "-h" in argv:
        with pytest.raises(SystemExit) as done:
            parser.parse_args(argv)
        assert done.value.code == 0
        return
    try:
        args = parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"depthcut {shlex.join(argv)}: {capsys.readouterr().err.strip()}")
    if args.command == "replay":  # its settings are in the run it names (tests/test_config_files.py)
        return
    config_from_args(args.config_class, args)


def test_every_page_the_readme_links_exists():
    text = README.read_text(encoding="utf-8")
    targets = [t for t in re.findall(r"\]\(([^)#\s]+)", text) if "://" not in t]
    assert targets, "the README links its docs pages"
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert missing == []
    linked = {(ROOT / t).resolve() for t in targets}
    assert [p.name for p in DOCS if p.resolve() not in linked] == [], "every docs page is reachable from the README"


def tiny_model_folder(folder: Path, layers: int) -> Path:
    from tiny import tiny_model, tiny_tokenizer

    tiny_model("llama", num_hidden_layers=layers).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_the_first_screen_runs_as_written(tmp_path, corpus_file):
    """The first screen's lines after the set-up (`make demo`, `make test`: the suite runs inside what
    they install) run in bash as written, from a folder holding `.venv`, with the built-in model swapped
    for a tiny random Llama of as many layers and small sizes appended; `depthcut` is found only through
    `source .venv/bin/activate`."""
    from transformers import AutoModelForCausalLM

    venv = Path(sys.prefix)
    if not ((venv / "bin" / "activate").is_file() and (venv / "bin" / "depthcut").is_file()):
        pytest.skip("runs in the project's virtual environment (.venv), as `make test` does")
    commands = [shlex.join(words(c)) for _, c in shell_commands(first_screen(README.read_text(encoding="utf-8")))]
    assert [c for c in commands if c.startswith("make ")] == ["make demo", "make test"]
    typed = [c for c in commands if not c.startswith("make ")]
    tiny = tiny_model_folder(tmp_path / "tiny-model", BUILT_IN_LAYERS)
    clone = tmp_path / "clone"
    clone.mkdir()
    (clone / ".venv").symlink_to(venv, target_is_directory=True)
    lines = []
    for command in typed:
        argv = [str(tiny) if word == BUILT_IN else word for word in words(command)]
        if argv[:2] == ["depthcut", "shrink"]:
            argv += ["--data", str(corpus_file), "--validate", str(corpus_file), *TINY_SHRINK]
        elif argv[:2] == ["depthcut", "generate"]:
            argv += TINY_GENERATE
        lines.append(shlex.join(argv))
    # `depthcut` is not on the PATH until the README's `source .venv/bin/activate` puts it there
    bin_dir = (venv / "bin").resolve()
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and Path(p).resolve() != bin_dir)
    assert shutil.which("depthcut", path=env["PATH"]) is None
    run = subprocess.run(["bash", "-c", "set -euo pipefail\n" + "\n".join(lines)], cwd=clone, env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, f"{lines}\n{run.stdout}\n{run.stderr}"
    shrink = next(words(c) for c in typed if c.startswith("depthcut shrink"))
    out = clone / shrink[shrink.index("--out") + 1]
    drop = int(shrink[shrink.index("--drop") + 1])
    written = AutoModelForCausalLM.from_pretrained(out)
    assert written.config.num_hidden_layers == BUILT_IN_LAYERS - drop
    assert len(json.loads((out / "depthcut.json").read_text())["removed_layers"]) == drop
    # the README's excerpt of the output is what the commands print (the summary lines whole where they
    # do not depend on the model's weights; the tiny model has its own layers and parameter counts)
    printed = run.stdout.splitlines()
    excerpt = next(lines for language, _, lines in fenced_blocks(first_screen(README.read_text(encoding="utf-8")))
                   if language == "text")
    prompt = next(words(c) for c in typed if c.startswith("depthcut generate"))[3]
    assert f"> {prompt}" in excerpt and f"> {prompt}" in printed
    assert f"pruned model: {out.name}" in excerpt and f"pruned model: {out.name}" in printed
    layers = f"{BUILT_IN_LAYERS} -> {BUILT_IN_LAYERS - drop} layers"
    for shown in (excerpt, printed):
        assert any(line.startswith("removed layers [") and layers in line for line in shown), shown
