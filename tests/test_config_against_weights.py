"""A config.json that does not describe its weights is refused before a model is built from it (issue
38, items 8 and 9), and what transformers cannot read in a model's files is named: config.json and its
field, tokenizer.json. `num_hidden_layers: 1000000000` over six stored layers hung `prune` and
`analyze` (a billion layers built); a `hidden_size` the weights lack made `prune --stream` write a
model that cannot be loaded. `shrink` checks its output's disk space before its selection."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from depthcut.cli import main
from depthcut.errors import DepthcutError
from depthcut.io.config_checks import REUSE_BOUND, check_config_against_weights
from depthcut.pipeline.configs import ShrinkConfig
from depthcut.pipeline.preflight import check_before_loading

# the command line in a fresh interpreter, saying whether torch (so any model) was imported
RUN_AND_REPORT = ("import sys\nfrom depthcut.cli import main\ncode = main(sys.argv[1:])\n"
                  "print('TORCH', 'torch' in sys.modules)\nsys.exit(code)\n")


def with_config(source: Path, target: Path, **changes) -> Path:
    """A copy of the model folder `source` whose config.json has `changes` (None: the key removed)."""
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (target / "config.json").write_text(json.dumps(config))
    return target


def refused_at_once(*argv) -> str:
    """The one error line of `depthcut ARGV` run afresh: exit 2 within a minute (a hang fails the test),
    torch never imported (so no model was built)."""
    done = subprocess.run([sys.executable, "-c", RUN_AND_REPORT, *map(str, argv)], capture_output=True, text=True,
                          check=False, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr[-2000:]
    assert "TORCH False" in done.stdout, done.stdout + done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("depthcut: error:")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


def commands(model: Path, out: Path, corpus: Path) -> list[list]:
    """prune in memory and shard by shard, analyze, shrink: every command that builds a model from MODEL."""
    data = ["--data", corpus, "--samples", "2", "--seq-len", "8"]
    return [["prune", model, "--layers", "2", "--out", out], ["prune", model, "--layers", "2", "--stream", "--out", out],
            ["analyze", model, *data, "--out", out], ["shrink", model, "--drop", "1", *data, "--out", out]]


def test_a_billion_layers_over_six_stored_is_refused_before_any_model_is_built(tmp_path, tiny_llama_dir, corpus_file):
    model = with_config(tiny_llama_dir, tmp_path / "model", num_hidden_layers=1_000_000_000)
    for argv in commands(model, tmp_path / "out", corpus_file):
        line = refused_at_once(*argv)
        assert f"{model / 'config.json'}: num_hidden_layers is 1,000,000,000, but the weights hold 6 numbered " \
               "layers" in line, (argv[0], line)
        assert not (tmp_path / "out").exists()


def test_the_library_load_refuses_it_too(tmp_path, tiny_llama_dir):
    from depthcut.model.loading import load_model

    model = with_config(tiny_llama_dir, tmp_path / "model", num_hidden_layers=12)
    with pytest.raises(DepthcutError, match=r"config.json: num_hidden_layers is 12, but the weights hold 6"):
        load_model(str(model))


def test_layers_reused_by_the_architecture_are_bounded_not_counted(tmp_path, tiny_llama_dir):
    # HRM's config runs its 16 stored layers 8 times (num_hidden_layers 128, H_cycles and L_cycles)
    reused = with_config(tiny_llama_dir, tmp_path / "reused", num_hidden_layers=6 * REUSE_BOUND, H_cycles=2)
    check_config_against_weights(reused)  # within the bound: left to the exact checks after the build
    beyond = with_config(tiny_llama_dir, tmp_path / "beyond", num_hidden_layers=6 * REUSE_BOUND + 1, H_cycles=2)
    with pytest.raises(DepthcutError, match=r"num_hidden_layers is 97, but the weights hold 6 numbered layers "
                                            r"\(even with layers reused, at most 16 times as many\)"):
        check_config_against_weights(beyond)
    # a config with fewer layers than stored is left to the layer checks that know the stack
    check_config_against_weights(with_config(tiny_llama_dir, tmp_path / "fewer", num_hidden_layers=4))


@pytest.mark.parametrize(("changes", "match"), [
    ({"hidden_size": 128}, r"hidden_size is 128, but no tensor of the weights has a dimension of that size"),
    ({"vocab_size": 10**12}, r"vocab_size is 1,000,000,000,000, but no tensor"),
    ({"num_hidden_layers": "six"}, r"num_hidden_layers is 'six'; it must be a positive whole number"),
    ({"num_attention_heads": 0}, r"num_attention_heads is 0; it must be a positive whole number"),
])
def test_sizes_the_weights_do_not_have_are_refused_naming_the_field(tmp_path, tiny_llama_dir, corpus_file, changes,
                                                                    match):
    model = with_config(tiny_llama_dir, tmp_path / "model", **changes)
    for argv in commands(model, tmp_path / "out", corpus_file)[:3]:
        line = refused_at_once(*argv)
        assert str(model / "config.json") in line and re.search(match, line), line


@pytest.mark.parametrize(("content", "match"), [
    (b'{"model_type": "llama", "hidden_size": 3', r"config.json is not valid JSON \(.*\); is it truncated\?"),
    (b"\x00\xff garbage", r"config.json is not UTF-8 text"),
    (b"[1, 2]", r"config.json holds a JSON list, not the object of a model config"),
])
def test_an_unreadable_config_is_named_in_every_path(tmp_path, tiny_llama_dir, corpus_file, content, match):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    (model / "config.json").write_bytes(content)
    for argv in commands(model, tmp_path / "out", corpus_file)[:3]:
        assert re.search(match, refused_at_once(*argv)), argv  # was "analyze failed: JSONDecodeError: ..."


def test_a_streamed_prune_refuses_a_hidden_size_the_weights_lack(capsys, tmp_path, tiny_llama_dir):
    # 64 is the weights' intermediate size, so a dimension of some tensor: only the shapes tell
    model = with_config(tiny_llama_dir, tmp_path / "model", hidden_size=64)
    out = tmp_path / "out"
    assert main(["prune", str(model), "--layers", "2", "--stream", "--out", str(out)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{model / 'config.json'} does not describe these weights" in line, line
    assert "is [96, 32] in model.safetensors, but the config makes it [96, 64] (hidden_size is 64" in line, line
    assert not out.exists()  # it wrote a model that could not be loaded


def test_a_value_transformers_does_not_know_is_named_with_its_field(capsys, tmp_path, tiny_llama_dir):
    model = with_config(tiny_llama_dir, tmp_path / "model",
                        rope_parameters={"rope_type": "nosuch", "rope_theta": 10000.0})
    for stream in ([], ["--stream"]):
        out = tmp_path / "out"
        assert main(["prune", str(model), "--layers", "2", "--out", str(out), *stream]) == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"{model / 'config.json'}: rope_parameters.rope_type is 'nosuch'" in line, line  # was "KeyError: 'nosuch'"
        assert not out.exists()


@pytest.mark.parametrize(("damage", "match"), [
    ("missing", r"could not load the tokenizer of model .* from .*model, which has no tokenizer.json"),
    ("truncated", r"model/tokenizer.json is not valid JSON \(.*; truncated\?\): the tokenizer cannot be read"),
    ("garbage", r"model/tokenizer.json is not UTF-8 text \(byte 1\)"),
    ("a field missing", r"from .*model/tokenizer.json: it lacks the field 'added_tokens'"),  # was: 'added_tokens'
])
def test_a_missing_or_corrupt_tokenizer_names_tokenizer_json(tmp_path, tiny_llama_dir, damage, match):
    from depthcut.model.loading import load_model

    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    tokenizer = model / "tokenizer.json"
    if damage == "missing":
        tokenizer.unlink()
    else:
        tokenizer.write_bytes({"truncated": tokenizer.read_bytes()[:1000], "garbage": b"{\xff\xfe",
                               "a field missing": b'{"version": "1.0"}'}[damage])
    with pytest.raises(DepthcutError, match=match):
        load_model(str(model))


def test_shrink_checks_its_output_space_before_the_selection(tmp_path, tiny_llama_dir, monkeypatch):
    weights = (tiny_llama_dir / "model.safetensors").stat().st_size
    monkeypatch.setattr("depthcut.io.output_checks.free_bytes", lambda path: weights // 10)
    config = ShrinkConfig(model=str(tiny_llama_dir), drop=2, out=str(tmp_path / "out"), dtype="checkpoint")
    with pytest.raises(DepthcutError, match=r"the smaller model needs about 0.2 MiB, but the disk holding .* has "
                                            r"0.0 MiB free"):
        check_before_loading(config)  # the checks before the model loads, not after the selection
    monkeypatch.setattr("depthcut.io.output_checks.free_bytes", lambda path: weights)
    check_before_loading(config)  # 4 of 6 layers' share fits


@pytest.mark.parametrize("stream", [False, True], ids=["in memory", "layer by layer"])
def test_a_gguf_without_a_tokenizer_is_named(capsys, tmp_path, corpus_file, stream):
    gguf = pytest.importorskip("gguf")
    from test_gguf import tiny_gguf

    source = tiny_gguf(tmp_path, "llama", gguf.GGMLQuantizationType.F32)  # written with no tokenizer
    out = tmp_path / "out"
    code = main(["analyze", str(source), "--data", str(corpus_file), "--samples", "2", "--seq-len", "8", "--quiet",
                 "--out", str(out), *(["--stream"] if stream else [])])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and f"could not load the tokenizer of model {str(source)!r} from the tokenizer in {source}'s " \
        "metadata: it has no tokenizer.ggml.tokens" in line, line  # was "analyze failed: KeyError: 'tokens'"
    assert not out.exists()


def test_a_generation_config_that_is_not_an_object_is_named(tmp_path, tiny_llama_dir):
    from depthcut.model.loading import load_model

    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    (model / "generation_config.json").write_text("[1]")
    with pytest.raises(DepthcutError, match=r"generation_config.json holds a JSON list, not the object of a "
                                            r"generation config"):  # was TypeError: 'list' object is not a mapping
        load_model(str(model))
