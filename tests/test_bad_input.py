"""Every bad input is one `depthcut: error:` line, exit 2, no traceback, nothing written (issue 12):
truncated and corrupt weights on every command that loads them, text data that is not UTF-8 in
every data format, a file named .parquet that is not one, impossible values caught before loading,
and the smaller items (custom code, auto_map code files, report --tolerance and --help)."""

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from depthcut.cli import main

SMALL = ["--samples", "2", "--seq-len", "8", "--batch-size", "2", "--quiet"]


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_refused(code: int, err: str, message: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("depthcut: error:")]
    assert len(errors) == 1 and message in errors[0], err


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- weights ---------------------------------------------------------------------------------------

def _damaged(tiny_llama_dir: Path, tmp_path: Path, how: str) -> Path:
    model = tmp_path / f"model-{how}"
    shutil.copytree(tiny_llama_dir, model)
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "header":
        data[8:40] = b"\xff" * 32
    elif how == "length":
        data[:8] = struct.pack("<Q", 10**12)
    elif how == "empty":
        data = b""
    weights.write_bytes(bytes(data))
    return model


COMMANDS = {
    "prune": ["prune", "{model}", "--layers", "1", "--out", "{out}"],
    "prune-stream": ["prune", "{model}", "--layers", "1", "--stream", "--out", "{out}"],
    "generate": ["generate", "{model}", "hello", "--max-new-tokens", "2"],
    "eval": ["eval", "{model}", "--loss", "c4", "--loss-samples", "2", "--loss-seq-len", "8", "--out", "{out}"],
    "analyze": ["analyze", "{model}", "--data", "{corpus}", "--out", "{out}", *SMALL],
    "analyze-stream": ["analyze", "{model}", "--data", "{corpus}", "--out", "{out}", "--stream", *SMALL],
}


@pytest.mark.parametrize("how, message", [("truncated", "past the end of the file (truncated?)"),
                                          ("header", "the header is not valid JSON"),
                                          ("length", "the header length is beyond the end of the file"),
                                          ("empty", "too short for a header")])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_damaged_weights_are_one_error(capsys, tmp_path, tiny_llama_dir, corpus_file, command, how, message):
    model = _damaged(tiny_llama_dir, tmp_path, how)
    before = _snapshot(model)
    out = tmp_path / "out"
    argv = [a.format(model=model, out=out, corpus=corpus_file) for a in COMMANDS[command]]
    code, _, err = _run(capsys, *argv)
    _assert_refused(code, err, f"{model / 'model.safetensors'} is not a valid safetensors file: ")
    assert message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [model.name]  # nothing written, no temporaries
    assert _snapshot(model) == before


def test_a_shard_index_that_is_not_json(capsys, tmp_path, tiny_llama_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    (model / "model.safetensors.index.json").write_bytes(b"\x00\xff not json")
    code, _, err = _run(capsys, "prune", model, "--layers", "1", "--stream", "--out", tmp_path / "out")
    _assert_refused(code, err, "is not a valid safetensors index")
    assert not (tmp_path / "out").exists()


def test_a_damaged_gguf_is_one_error(capsys, tmp_path):
    junk = tmp_path / "model.gguf"
    junk.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    code, _, err = _run(capsys, "generate", junk, "hi")
    # checked before transformers reads it: the file named, and what is wrong with it
    _assert_refused(code, err, f"{junk} is not a valid GGUF file: the tensor count claims 18,446,744,073,709,551,615")


# --- text data: one decoding policy (strict UTF-8, file and line named) ---------------------------

BAD_DATA = {
    "bad.txt": (b"fine text here\n\nmore text\ncaf\xe9 au lait\n", "bad.txt:4: not UTF-8 text (byte 0xe9 at column 4)"),
    "bad.jsonl": (b'{"text": "fine"}\n{"text": "caf\xe9"}\n', "bad.jsonl:2: not UTF-8 text (byte 0xe9 at column 14)"),
    "bad.json": (b'[{"text": "fine"},\n {"text": "\xff"}]', "bad.json:2: not UTF-8 text (byte 0xff at column 12)"),
    "binary.txt": (b"text\n\x00\x01\x02\x03binary", "binary.txt:2: a NUL byte at column 1: binary data, not text"),
    "binary.jsonl": (bytes(range(256)) * 4, "binary.jsonl:1: a NUL byte at column 1"),
    "utf16.jsonl": ('{"text": "fine"}\n'.encode("utf-16"), "utf16.jsonl:1: not UTF-8 text (byte 0xff at column 1)"),
    "fake.parquet": (b"this is not parquet at all\n", "fake.parquet is not a readable parquet file"),
    "empty.parquet": (b"", "empty.parquet is not a readable parquet file"),
}


@pytest.mark.parametrize("name", list(BAD_DATA))
@pytest.mark.parametrize("command", ["analyze", "eval-loss", "heal"])
def test_text_data_that_is_not_utf8_is_one_error_naming_file_and_line(capsys, tmp_path, tiny_llama_dir, command,
                                                                      name):
    content, message = BAD_DATA[name]
    data = tmp_path / name
    data.write_bytes(content)
    out = tmp_path / "out"
    argv = {"analyze": ["analyze", tiny_llama_dir, "--data", data, "--out", out, *SMALL],
            "eval-loss": ["eval", tiny_llama_dir, "--loss", data, "--out", out, "--quiet"],
            "heal": ["heal", tiny_llama_dir, "--data", data, "--out", out, "--steps", "1", "--quiet"]}[command]
    code, _, err = _run(capsys, *argv)
    _assert_refused(code, err, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name] and data.read_bytes() == content


def test_a_folder_of_data_names_the_bad_file(capsys, tmp_path, tiny_llama_dir):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"text": "good text"}\n')
    (folder / "b.txt").write_bytes(b"ok\n\xc3\x28 broken\n")
    code, _, err = _run(capsys, "analyze", tiny_llama_dir, "--data", folder, "--out", tmp_path / "out", *SMALL)
    _assert_refused(code, err, f"{folder / 'b.txt'}:2: not UTF-8 text (byte 0xc3 at column 1)")


def test_a_byte_order_mark_is_not_an_error(capsys, tmp_path, tiny_llama_dir, corpus_file):
    """A leading byte-order mark is dropped, not read as text: the analysis equals the one of the same
    file without it."""
    data = tmp_path / "bom.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + corpus_file.read_bytes())
    for name, source in (("with", data), ("without", corpus_file)):
        code, _, err = _run(capsys, "analyze", tiny_llama_dir, "--data", source, "--out", tmp_path / name, *SMALL)
        assert code == 0, err
    with_mark, without = (json.loads((tmp_path / name / "analysis.json").read_text()) for name in ("with", "without"))
    assert with_mark["metrics"] == without["metrics"]
    assert with_mark["metadata"]["data"]["tokens"] == without["metadata"]["data"]["tokens"]


def test_task_data_that_is_not_utf8(capsys, tmp_path, tiny_llama_dir):
    (tmp_path / "items.jsonl").write_bytes(b'{"q": "a", "choices": ["x", "y"], "label": 0}\n{"q": "\xff"}\n')
    (tmp_path / "task.yaml").write_text(  # lm-eval's task format, data beside the file
        "task: mine\ndataset_path: json\ndataset_kwargs:\n  data_files: {test: items.jsonl}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n")
    code, _, err = _run(capsys, "eval", tiny_llama_dir, "--tasks", tmp_path / "task.yaml", "--out", tmp_path / "e.json")
    _assert_refused(code, err, "items.jsonl:2: not UTF-8 text (byte 0xff at column 8)")
    assert not (tmp_path / "e.json").exists()


def test_an_analysis_file_that_is_binary(capsys, tmp_path, tiny_llama_dir):
    analysis = tmp_path / "analysis.json"
    analysis.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    code, _, err = _run(capsys, "prune", tiny_llama_dir, "--drop", "1", "--analysis", analysis, "--out",
                        tmp_path / "out")
    _assert_refused(code, err, f"{analysis}:1: not UTF-8 text")


def test_sweep_results_that_are_binary(capsys, tmp_path):
    (tmp_path / "results.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    code, _, err = _run(capsys, "report", tmp_path)
    _assert_refused(code, err, "results.jsonl:1: not UTF-8 text")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl"]


# --- impossible values before the model loads --------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--drop", "0"], "--drop must be between 1 and 5"),
    (["--drop", "-3", "--strategy", "deepest"], "--drop must be between 1 and 5"),
    (["--drop", "6", "--strategy", "deepest"], "--drop must be between 1 and 5"),
    (["--layers", "5:3"], "needs stop > start"),
    (["--layers", "2,2"], "listed more than once"),
    (["--layers", "0:6"], "cannot remove all 6 layers"),
    (["--layers", "9"], "out of range"),
])
def test_impossible_layer_choices_fail_before_the_model_loads(capsys, tmp_path, tiny_llama_dir, argv, message):
    code, _, err = _run(capsys, "prune", tiny_llama_dir, *argv, "--out", tmp_path / "out")
    _assert_refused(code, err, message)
    assert "loading" not in err and list(tmp_path.iterdir()) == []


# --- custom code, auto_map, report ---------------------------------------------------------------------

CONFIGURATION = "from transformers import LlamaConfig\n\n\nclass TinyConfig(LlamaConfig):\n    model_type = '{kind}'\n"
MODELING = ("from transformers import LlamaForCausalLM\n\nfrom .configuration_tiny import TinyConfig\n\n\n"
            "class TinyForCausalLM(LlamaForCausalLM):\n    config_class = TinyConfig\n")


def _custom_model(tiny_llama_dir: Path, folder: Path, kind: str) -> Path:
    """The tiny Llama with an auto_map to its own code; `kind` "llama" is also loadable without it."""
    shutil.copytree(tiny_llama_dir, folder)
    (folder / "configuration_tiny.py").write_text(CONFIGURATION.format(kind=kind))
    (folder / "modeling_tiny.py").write_text(MODELING)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = kind
    config["auto_map"] = {"AutoConfig": "configuration_tiny.TinyConfig",
                          "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_the_custom_code_refusal_says_how_to_allow_it(capsys, tmp_path, tiny_llama_dir):
    model = _custom_model(tiny_llama_dir, tmp_path / "custom", "tiny-custom")
    code, _, err = _run(capsys, "generate", model, "hi")
    _assert_refused(code, err, "contains custom code")
    assert "pass --trust-remote-code" in err


@pytest.mark.parametrize("stream", [False, True])
def test_pruning_a_model_with_auto_map_keeps_its_code_files(capsys, tmp_path, tiny_llama_dir, stream):
    from transformers import AutoModelForCausalLM

    model = _custom_model(tiny_llama_dir, tmp_path / "custom", "llama")  # loads natively: its code is not run
    out = tmp_path / "pruned"
    code, _, err = _run(capsys, "prune", model, "--layers", "1", "--out", out, *(["--stream"] if stream else []))
    assert code == 0, err
    assert (out / "modeling_tiny.py").read_text() == MODELING
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]
    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(loaded).__name__ == "TinyForCausalLM" and loaded.config.num_hidden_layers == 5


def test_report_refuses_an_impossible_tolerance(capsys, tmp_path):
    (tmp_path / "results.jsonl").write_text(json.dumps({"type": "point", "key": "none/0/pruned"}) + "\n")
    for tolerance in ("-1", "0", "1.5"):
        code, _, err = _run(capsys, "report", tmp_path, "--tolerance", tolerance)
        _assert_refused(code, err, "tolerance must be a fraction between 0 and 1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl"]


def test_report_help_has_an_example():
    result = subprocess.run([sys.executable, "-m", "depthcut.cli", "report", "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "examples:" in result.stdout and "depthcut report sweeps/" in result.stdout


def test_run_totals_of_a_resumed_heal():
    from types import SimpleNamespace

    from depthcut.healing.export import run_totals

    log = [{"step": s, "tokens": 64 * s} for s in range(1, 7)]
    resumed = SimpleNamespace(steps=4, tokens=256, log=log)
    assert run_totals(resumed) == {"steps": 6, "tokens": 384, "resumed_from_step": 2, "steps_this_run": 4,
                                   "tokens_this_run": 256}
    fresh = SimpleNamespace(steps=6, tokens=384, log=log)
    assert run_totals(fresh)["resumed_from_step"] is None and run_totals(fresh)["steps"] == 6


# --- names read from files (issue 24) -----------------------------------------------------------------

@pytest.mark.parametrize("shard", ["../x.safetensors", "/tmp/x.safetensors", "sub/x.safetensors", "", ".", "..",
                                   "x\u0000.safetensors", 7])
def test_a_shard_name_that_leaves_the_folder_is_refused(capsys, tmp_path, tiny_llama_dir, shard):
    from safetensors import safe_open

    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    with safe_open(model / "model.safetensors", "pt") as handle:
        names = list(handle.keys())
    (tmp_path / "x.safetensors").write_bytes((model / "model.safetensors").read_bytes())
    weight_map = {name: "model.safetensors" for name in names} | {names[0]: shard}
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    before = _snapshot(tmp_path)
    code, _, err = _run(capsys, "prune", model, "--layers", "1", "--stream", "--out", tmp_path / "out" / "pruned")
    _assert_refused(code, err, f"{model / 'model.safetensors.index.json'} names the file {shard!r}, which is not a "
                               "plain file name in its folder")
    assert _snapshot(tmp_path) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("module", ["..evil.Model", "sub..evil.Model"])
def test_auto_map_code_names_that_leave_the_folder_are_refused(capsys, tmp_path, tiny_llama_dir, module):
    model = _custom_model(tiny_llama_dir, tmp_path / "custom", "llama")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"]["AutoModel"] = module
    (model / "config.json").write_text(json.dumps(config))
    code, _, err = _run(capsys, "prune", model, "--layers", "1", "--out", tmp_path / "pruned")
    _assert_refused(code, err, "which leads outside its folder: refused")
    assert not (tmp_path / "pruned").exists()


# --- numbers that are not finite, and command-line mistakes (issue 24) ---------------------------------

@pytest.mark.parametrize("argv, message", [
    (["heal", "{model}", "--data", "{corpus}", "--lr", "inf"], "argument --lr: 'inf' is not a finite number"),
    (["heal", "{model}", "--data", "{corpus}", "--lr", "nan"], "argument --lr: 'nan' is not a finite number"),
    (["heal", "{model}", "--data", "{corpus}", "--kd-temperature", "inf"], "argument --kd-temperature: 'inf'"),
    (["heal", "{model}", "--data", "{corpus}", "--dropout=-inf"], "argument --dropout: '-inf' is not a finite"),
    (["heal", "{model}", "--data", "{corpus}", "--alpha", "NaN"], "argument --alpha: 'NaN' is not a finite"),
    (["sweep", "{model}", "--tasks", "arc_easy", "--heal-lr", "infinity"], "argument --heal-lr: 'infinity'"),
    (["sweep", "{model}", "--loss", "c4", "--tolerance", "nan"], "argument --tolerance: 'nan' is not a finite"),
    (["prune", "{model}", "--layers", "1", "--repair", "lstsqq"], "argument --repair: invalid choice: 'lstsqq'"),
    (["prune", "{model}", "--layers", "1", "--drop", "x"], "argument --drop: invalid int value: 'x'"),
])
def test_command_line_mistakes_are_one_error_line(capsys, tmp_path, tiny_llama_dir, corpus_file, argv, message):
    argv = [a.format(model=tiny_llama_dir, corpus=corpus_file) for a in argv] + ["--out", str(tmp_path / "out")]
    code, out, err = _run(capsys, *argv)
    _assert_refused(code, err, message)
    assert err.count("\n") == 1 and "usage:" not in err and out == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("field", ["lr", "kd_temperature", "kd_weight", "dropout", "alpha", "heldout_fraction"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_the_recipe_refuses_numbers_that_are_not_finite(field, value):
    from depthcut.errors import DepthcutError
    from depthcut.healing.recipe import HealRecipe

    with pytest.raises(DepthcutError, match=f"--{field.replace('_', '-')} must be a finite number"):
        HealRecipe(**{field: value})


def test_a_heal_whose_loss_diverges_stops_writes_nothing_and_keeps_its_checkpoints(capsys, tmp_path, tiny_llama_dir,
                                                                                   corpus_file):
    out = tmp_path / "healed"
    code, _, err = _run(capsys, "heal", tiny_llama_dir, "--data", corpus_file, "--out", out, "--steps", "4",
                        "--lr", "1e30", "--seq-len", "32", "--batch-size", "2", "--rank", "4", "--warmup-steps", "0",
                        "--checkpoint-every", "1", "--heldout-windows", "2", "--quiet")
    _assert_refused(code, err, "the training loss became nan at step 2: training diverged, nothing was written")
    assert not out.exists()
    checkpoints = tmp_path / "healed-checkpoints"
    assert [p.name for p in checkpoints.iterdir() if p.name.startswith("step-")] == ["step-0000001"]
    assert "checkpoints kept in" in err


def test_generate_refuses_an_empty_prompt(capsys, tiny_llama_dir):
    code, out, err = _run(capsys, "generate", tiny_llama_dir, "")
    _assert_refused(code, err, "a prompt is empty")
    assert "loading" not in err and out == ""


def test_eval_help_says_a_task_file_is_code():
    result = subprocess.run([sys.executable, "-m", "depthcut.cli", "eval", "--help"], capture_output=True, text=True,
                            check=False)
    text = " ".join(result.stdout.split())
    assert result.returncode == 0
    assert "A task file is code: as in lm-eval, its `!function` entries import and run the Python files" in text
    assert "a task file is code: its !function entries run the Python files beside it" in text  # --tasks' own help
    docs = (Path(__file__).resolve().parents[1] / "docs" / "tasks.md").read_text()
    assert "**A task file is code.**" in docs


@pytest.mark.parametrize("damage, message", [("truncate", "state.pt cannot be read"),
                                             ("remove", "recipe.json cannot be read (No such file or directory")])
def test_resuming_from_a_damaged_checkpoint_is_one_error(capsys, tmp_path, tiny_llama_dir, corpus_file, damage,
                                                         message):
    out = tmp_path / "healed"
    argv = ["heal", tiny_llama_dir, "--data", corpus_file, "--out", out, "--steps", "4", "--lr", "1e30", "--seq-len",
            "32", "--batch-size", "2", "--rank", "4", "--warmup-steps", "0", "--checkpoint-every", "1",
            "--heldout-windows", "2", "--quiet"]
    assert _run(capsys, *argv)[0] == 2  # diverges at step 2, after the checkpoint of step 1
    step = tmp_path / "healed-checkpoints" / "step-0000001"
    if damage == "truncate":
        state = (step / "state.pt").read_bytes()
        (step / "state.pt").write_bytes(state[: len(state) // 2])
    else:
        (step / "recipe.json").unlink()
    code, _, err = _run(capsys, *argv, "--resume")
    _assert_refused(code, err, f"checkpoint file {step}/{message}")
    assert "start afresh with --force instead of --resume" in err and not out.exists()


# --- a config that does not describe its weights (issue 24) --------------------------------------------

@pytest.mark.parametrize("layers, message", [(7, "9 weights missing (e.g. model.layers.6."),
                                             (5, "9 weights unexpected (e.g. model.layers.5.")])
@pytest.mark.parametrize("stream", [False, True])
def test_a_config_whose_layer_count_disagrees_with_the_weights(capsys, tmp_path, tiny_llama_dir, layers, message,
                                                               stream):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers}))
    code, _, err = _run(capsys, "prune", model, "--layers", "1", "--out", tmp_path / "out",
                        *(["--stream"] if stream else []))
    # more layers than stored: refused before a model is built, on both paths (depthcut.io.config_checks)
    expected = (f"config.json: num_hidden_layers is {layers}, but the weights hold 6 numbered layers" if layers > 6
                else f"config.json says {layers} layers, but the weights hold 6 (layers 0 to 5)" if stream
                else f"its weights do not match its config.json: {message}")
    _assert_refused(code, err, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# --- the command line's last net -----------------------------------------------------------------------------

def test_an_error_no_check_explains_is_one_line_and_debug_shows_the_traceback(capsys, monkeypatch, tmp_path,
                                                                            tiny_llama_dir):
    import depthcut.pipeline.prune

    def broken(config):
        raise KeyError("model.layers.3.mlp.weig=t")

    monkeypatch.setattr(depthcut.pipeline.prune, "prune_to", broken)
    argv = ["prune", str(tiny_llama_dir), "--layers", "2", "--out", str(tmp_path / "out")]
    code, _, err = _run(capsys, *argv)
    # what it read is named (here no file is on the error's way: the command's inputs), and what a KeyError means
    _assert_refused(code, err, f"prune failed reading its inputs ({tiny_llama_dir}): KeyError: "
                               "'model.layers.3.mlp.weig=t' (a field it expected is missing); the unfinished output "
                               "was removed (an input depthcut does not check, or a bug: run with --debug")
    with pytest.raises(KeyError):
        main(["--debug", *argv])


def test_the_last_net_names_the_file_the_failing_code_was_reading(capsys, monkeypatch, tmp_path, tiny_llama_dir):
    import depthcut.pipeline.prune

    def reads_a_damaged_file(config):
        path = Path(config.model) / "config.json"
        return json.loads(path.read_text()[:40])  # a reader depthcut does not check

    monkeypatch.setattr(depthcut.pipeline.prune, "prune_to", reads_a_damaged_file)
    code, _, err = _run(capsys, "prune", tiny_llama_dir, "--layers", "2", "--out", tmp_path / "out")
    _assert_refused(code, err, f"prune failed reading {tiny_llama_dir / 'config.json'}: JSONDecodeError: ")
