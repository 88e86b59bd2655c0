"""Config files (`--config FILE`, YAML or JSON, the flags overriding it) and replay (`depthcut replay
OUT`, `--config OUT/depthcut.json`): docs/config-files.md."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from depthcut.cli import main
from depthcut.cli.commands import COMMANDS
from depthcut.cli.main import build_parser, parse_arguments
from depthcut.errors import DepthcutError
from depthcut.pipeline.config_files import settings_of
from depthcut.pipeline.options import config_from_args

SHRINK_FLAGS = ["shrink", "smollm2-135m", "--out", "small", "--seq-len", "128", "--repairs", "none,cosine",
                "--heal-lr", "0.0001", "--sample-mode", "documents", "--quiet", "--fraction", "0.25",
                "--tasks", "arc_easy,boolq"]
SHRINK_YAML = """\
model: smollm2-135m
out: small
seq-len: 128          # either spelling of a field
repairs: [none, cosine]
heal_lr: 1e-4         # YAML reads this as text; the option reads it as --heal-lr does
sample_mode: documents
quiet: true
fraction: 0.25
tasks: arc_easy,boolq # a comma list as on the command line
"""
SHRINK_JSON = {"model": "smollm2-135m", "out": "small", "seq_len": 128, "repairs": ["none", "cosine"],
               "heal-lr": 0.0001, "sample_mode": "documents", "quiet": True, "fraction": 0.25,
               "tasks": ["arc_easy", "boolq"]}


def parsed(argv):
    args = parse_arguments(build_parser(), [str(a) for a in argv])
    return config_from_args(args.config_class, args)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_yaml_and_a_json_file_give_the_config_the_flags_give(tmp_path):
    from_flags = parsed(SHRINK_FLAGS)
    assert from_flags.seq_len == 128 and from_flags.repairs == ("none", "cosine")  # not the defaults
    from_yaml = parsed(["shrink", "--config", write(tmp_path / "recipe.yaml", SHRINK_YAML)])
    from_json = parsed(["shrink", "--config", write(tmp_path / "recipe.json", json.dumps(SHRINK_JSON))])
    assert from_yaml == from_flags
    assert from_json == from_flags


def test_the_flags_given_override_the_file(tmp_path):
    recipe = write(tmp_path / "recipe.yaml", SHRINK_YAML)
    config = parsed(["shrink", "other-model", "--config", recipe, "--seq-len", "64", "--repairs", "lstsq"])
    assert (config.model, config.seq_len, config.repairs) == ("other-model", 64, ("lstsq",))
    assert config.heal_lr == 1e-4 and config.out == "small"  # the rest still from the file
    # the file is read wherever --config stands among the flags
    assert parsed(["shrink", "--seq-len", "64", "--config", recipe]).seq_len == 64


def test_an_option_given_replaces_the_files_alternatives_to_it(tmp_path):
    # the file's --fraction and a --drop given: the flag overrides the file's choice of size
    recipe = write(tmp_path / "recipe.yaml", SHRINK_YAML)
    config = parsed(["shrink", "--config", recipe, "--drop", "2"])
    assert (config.drop, config.fraction) == (2, None)
    flags_without_fraction = [a for a in SHRINK_FLAGS if a not in ("--fraction", "0.25")]
    assert config == parsed([*flags_without_fraction, "--drop", "2"])


@pytest.mark.parametrize("text, expected", [
    ("seqlen: 3\n", ["'seqlen' is not a setting of depthcut shrink", "did you mean 'seq_len'?"]),
    ("objective: kl\n", ["objective: 'kl' is not one of --objective's choices"]),
    ("sample_mode: document\n", ["sample_mode", "did you mean 'documents'?"]),
    ("seq_len: many\n", ["seq_len", "invalid literal"]),
    ("quiet: 3\n", ["--quiet is a flag"]),
    ("seq_len: null\n", ["--seq-len needs a value"]),
    ("- seq_len\n", ["holds a list, not a mapping"]),
    ("seq_len: [\n", ["is not valid YAML (line 2)"]),
])
def test_a_mistake_in_the_file_is_refused_in_one_line_naming_the_file(tmp_path, capsys, text, expected):
    recipe = write(tmp_path / "recipe.yaml", text)
    out = tmp_path / "out"
    assert main(["shrink", "smollm2-135m", "--out", str(out), "--config", str(recipe)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("depthcut: error: ") and str(recipe) in error, error
    for part in expected:
        assert part in error, error
    assert not out.exists()


def test_a_missing_file_and_malformed_json_are_refused(tmp_path, capsys):
    assert main(["prune", "m", "--out", str(tmp_path / "o"), "--config", str(tmp_path / "none.json")]) == 2
    assert "config file" in capsys.readouterr().err
    broken = write(tmp_path / "broken.json", '{"seq_len": 1,}')
    assert main(["prune", "m", "--out", str(tmp_path / "o"), "--config", str(broken)]) == 2
    assert "is not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", [entry[0] for entry in COMMANDS])
def test_the_recorded_settings_of_every_command_parse_back_to_its_config(tmp_path, command):
    """What a run records (settings_of, through JSON) is read back to the same config: replay is exact."""
    required = {"model": "smollm2-135m", "out": "o", "folder": "f", "prompt": "Hello, world", "data": "c4"}
    parser = build_parser().commands[command]
    positional = [required[a.dest] for a in parser._actions if not a.option_strings and a.dest in required]
    options = [f"--{a.dest}" for a in parser._actions if a.required and a.option_strings]
    argv = [command, *positional, *[item for flag in options for item in (flag, required[flag[2:]])]]
    original = parsed(argv)
    recorded = write(tmp_path / "settings.json", json.dumps(settings_of(original)))
    assert parsed([command, "--config", recorded]) == original
    if command == "shrink":  # and settings other than the defaults
        changed = parsed(SHRINK_FLAGS)
        write(recorded, json.dumps(settings_of(changed)))
        assert parsed([command, "--config", recorded]) == changed != original


def test_several_prompts_are_read_from_a_list_without_splitting_at_commas(tmp_path):
    recipe = write(tmp_path / "prompts.yaml", "model: smollm2-135m\nprompt: ['Hello, world', Goodbye]\n")
    assert parsed(["generate", "--config", recipe]).prompt == parsed(
        ["generate", "smollm2-135m", "Hello, world", "Goodbye"]).prompt


def tensors(folder: Path) -> dict:
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    return {name: tensor for file in files for name, tensor in load_file(file).items()}


@pytest.fixture
def recorded_prune(tmp_path, tiny_llama_dir):
    first = tmp_path / "first"
    assert main(["prune", str(tiny_llama_dir), "--layers", "2:4", "--out", str(first), "--quiet"]) == 0
    return first


def test_replay_writes_the_same_model_and_records_the_same_settings(tmp_path, recorded_prune, capsys):
    first_record = json.loads((recorded_prune / "depthcut.json").read_text())
    invocation = first_record["environment"]["invocation"]
    assert invocation["command"] == "prune" and invocation["settings"]["layers"] == "2:4"
    again = tmp_path / "again"
    assert main(["replay", str(recorded_prune), "--out", str(again)]) == 0
    expected, replayed = tensors(recorded_prune), tensors(again)
    assert expected.keys() == replayed.keys()
    assert all(expected[name].equal(replayed[name]) for name in expected)
    settings = json.loads((again / "depthcut.json").read_text())["environment"]["invocation"]["settings"]
    assert settings == {**invocation["settings"], "out": str(again)}
    assert json.loads((again / "depthcut.json").read_text())["removed_layers"] == first_record["removed_layers"]


def test_a_depthcut_json_as_config_reruns_its_command_and_flags_still_override(tmp_path, recorded_prune, capsys):
    again = tmp_path / "again"
    assert main(["prune", "--config", str(recorded_prune / "depthcut.json"), "--out", str(again),
                 "--layers", "1:3"]) == 0
    record = json.loads((again / "depthcut.json").read_text())
    assert record["removed_layers"] == [1, 2]
    assert record["environment"]["invocation"]["settings"]["layers"] == "1:3"


def test_replay_never_writes_over_the_recorded_output_unasked(tmp_path, recorded_prune, capsys):
    before = (recorded_prune / "depthcut.json").read_text()
    assert main(["replay", str(recorded_prune)]) == 2
    assert "--out NEW" in capsys.readouterr().err
    # as a config file, the recorded --force is not carried over: the existing output is refused
    assert main(["prune", "--config", str(recorded_prune / "depthcut.json")]) == 2
    assert capsys.readouterr().err.startswith("depthcut: error:")
    assert (recorded_prune / "depthcut.json").read_text() == before
    assert main(["shrink", "--config", str(recorded_prune / "depthcut.json")]) == 2
    assert "records a `depthcut prune`, not shrink" in capsys.readouterr().err
    # --force without --out: the recorded output is written again, in place
    expected = tensors(recorded_prune)
    assert main(["replay", str(recorded_prune), "--force"]) == 0
    replayed = tensors(recorded_prune)
    assert expected.keys() == replayed.keys() and all(expected[k].equal(replayed[k]) for k in expected)


def test_a_record_of_another_schema_or_without_its_command_is_refused(tmp_path, recorded_prune):
    record = json.loads((recorded_prune / "depthcut.json").read_text())
    record["environment"]["invocation"]["schema"] = "depthcut.invocation/2"
    other = write(tmp_path / "other.json", json.dumps(record))
    with pytest.raises(DepthcutError, match="invocation/2; this depthcut replays depthcut.invocation/1"):
        parse_arguments(build_parser(), ["replay", str(other), "--out", str(tmp_path / "x")])
    record["environment"]["invocation"] = None  # what the Python API writes
    write(other, json.dumps(record))
    with pytest.raises(DepthcutError, match="records no command to replay"):
        parse_arguments(build_parser(), ["replay", str(other), "--out", str(tmp_path / "x")])


def test_an_analysis_folder_replays_its_analyze_settings(tmp_path, tiny_llama_dir, corpus_file, capsys):
    first, again = tmp_path / "analysis", tmp_path / "again"
    argv = ["analyze", str(tiny_llama_dir), "--data", str(corpus_file), "--out", str(first), "--samples", "4",
            "--seq-len", "16", "--batch-size", "2", "--metrics", "angular_last_token", "--quiet"]
    assert main(argv) == 0
    replayed = parsed(["replay", first, "--out", again])
    assert replayed == parsed([*argv[:5], str(again), *argv[6:]])
    assert replayed.metrics == ("angular_last_token",)
    with pytest.raises(DepthcutError, match="holds no depthcut.json or analysis.json"):
        parsed(["replay", tmp_path, "--out", again])
