"""The library entry points (depthcut.pipeline) write what the commands write, file by file, and
the command line's options are built from the configs (one default per option)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from depthcut.cli import build_parser, main
from depthcut.cli.commands import COMMANDS
from depthcut.errors import DepthcutError
from depthcut.pipeline import (
    AnalyzeConfig,
    analyze_to,
    evaluate_to,
    generate,
    prune_to,
    report_to,
    sweep_to,
)
from depthcut.pipeline.options import add_config_arguments, comma_list, config_from_args, option

SMALL = {"samples": 4, "seq_len": 16, "batch_size": 2, "quiet": True}
SMALL_ARGS = ["--samples", "4", "--seq-len", "16", "--batch-size", "2", "--quiet"]
# What differs between two runs of the same work: when and where it ran, and how long it took.
VOLATILE = {"environment", "created", "seconds", "inference_seconds", "forward_seconds", "tokens_per_second", "path"}


def _scrub(value):
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


def _content(path: Path):
    if path.suffix == ".json":
        return _scrub(json.loads(path.read_text()))
    if path.suffix == ".jsonl":
        return [_scrub(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    if path.name == "README.md":  # the model card names the creation time, and the folder it loads from
        return [line for line in path.read_text().splitlines()
                if not line.startswith("Made with depthcut") and "from_pretrained(" not in line]
    return path.read_bytes()


def assert_same_outputs(a: Path, b: Path, compare=lambda path: True) -> None:
    """The same files under `a` and `b` with the same content (times and places aside)."""
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    assert files_a, "nothing was written"
    for name in files_a:
        if compare(name):
            assert _content(a / name) == _content(b / name), name


def test_analyze_to_writes_what_the_command_writes(tmp_path, tiny_llama_dir, corpus_file):
    assert main(["analyze", str(tiny_llama_dir), "--data", str(corpus_file), "--out", str(tmp_path / "cli"),
                 *SMALL_ARGS]) == 0
    analysis = analyze_to(model=str(tiny_llama_dir), data=str(corpus_file), out=str(tmp_path / "lib"), **SMALL)
    assert_same_outputs(tmp_path / "cli", tmp_path / "lib")
    assert analysis.num_layers == 6
    assert json.loads((tmp_path / "lib" / "analysis.json").read_text())["best_block"] == {
        str(n): list(block) for n, block in analysis.best_blocks().items()}


def test_analyze_to_takes_a_config_and_streams_when_asked(tmp_path, tiny_llama_dir, corpus_file):
    config = AnalyzeConfig(model=str(tiny_llama_dir), data=str(corpus_file), out=str(tmp_path / "mem"), **SMALL)
    in_memory = analyze_to(config, dtype="float32")
    streamed = analyze_to(dataclasses.replace(config, out=str(tmp_path / "stream"), stream=True), dtype="float32")
    for name, values in in_memory.metrics.items():
        assert np.allclose(np.array(streamed.metrics[name], dtype=float), np.array(values, dtype=float),
                           atol=1e-6, equal_nan=True), name
    assert json.loads((tmp_path / "stream" / "analysis.json").read_text())["metadata"]["streamed"]


@pytest.mark.parametrize("how", [["--strategy", "deepest"], ["--layers", "1:3"], ["--strategy", "angular"]])
def test_prune_to_writes_what_the_command_writes(tmp_path, tiny_llama_dir, corpus_file, how):
    fields = {"drop": 2, "strategy": how[1]} if how[0] == "--strategy" else {"layers": how[1]}
    drop = ["--drop", "2"] if "drop" in fields else []
    assert main(["prune", str(tiny_llama_dir), *drop, *how, "--data", str(corpus_file), "--out",
                 str(tmp_path / "cli"), *SMALL_ARGS]) == 0
    result = prune_to(model=str(tiny_llama_dir), data=str(corpus_file), out=str(tmp_path / "lib"), **fields, **SMALL)
    assert_same_outputs(tmp_path / "cli", tmp_path / "lib")
    saved = json.loads((tmp_path / "lib" / "depthcut.json").read_text())
    assert result.removed == saved["removed_layers"] and len(result.removed) == 2
    assert result.summary()[-1] == f"pruned model: {tmp_path / 'lib'}"


def test_prune_to_streams_a_safetensors_folder_as_the_command_does(tmp_path, tiny_llama_dir):
    assert main(["prune", str(tiny_llama_dir), "--layers", "2:4", "--stream", "--out", str(tmp_path / "cli")]) == 0
    result = prune_to(model=str(tiny_llama_dir), layers="2:4", stream=True, out=str(tmp_path / "lib"))
    assert result.provenance["backend"] == "shard_by_shard"
    assert_same_outputs(tmp_path / "cli", tmp_path / "lib")


def test_evaluate_to_writes_what_the_command_writes(tmp_path, tiny_llama_dir, corpus_file):
    options = {"loss": str(corpus_file), "loss_samples": 4, "loss_seq_len": 16}
    assert main(["eval", str(tiny_llama_dir), "--loss", str(corpus_file), "--loss-samples", "4",
                 "--loss-seq-len", "16", "--quiet", "--out", str(tmp_path / "cli" / "eval.json")]) == 0
    result = evaluate_to(model=str(tiny_llama_dir), out=str(tmp_path / "lib" / "eval.json"), quiet=True, **options)
    assert_same_outputs(tmp_path / "cli", tmp_path / "lib")
    assert result["loss"]["loss"] > 0


def test_sweep_to_and_report_to_write_what_the_commands_write(tmp_path, tiny_llama_dir, corpus_file):
    argv = ["--drop", "0,2", "--strategies", "deepest", "--loss", str(corpus_file), "--loss-samples", "2",
            "--loss-seq-len", "16", "--data", str(corpus_file), *SMALL_ARGS]
    assert main(["sweep", str(tiny_llama_dir), *argv, "--out", str(tmp_path / "cli")]) == 0
    report = sweep_to(model=str(tiny_llama_dir), drop="0,2", strategies=("deepest",), loss=str(corpus_file),
                      loss_samples=2, loss_seq_len=16, data=str(corpus_file), out=str(tmp_path / "lib"), **SMALL)
    assert report == tmp_path / "lib" / "report.html" and report.is_file()
    # The figures and the page show forward timings, which differ from run to run; the results do not.
    assert_same_outputs(tmp_path / "cli", tmp_path / "lib", compare=lambda name: name.suffix == ".jsonl")
    assert main(["report", str(tmp_path / "cli"), "--tolerance", "0.1"]) == 0
    assert report_to(folder=str(tmp_path / "lib"), tolerance=0.1) == report


def test_generate_returns_what_the_command_prints(capsys, tiny_llama_dir):
    assert main(["generate", str(tiny_llama_dir), "the quick", "a lazy", "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out
    completions = generate(model=str(tiny_llama_dir), prompt=("the quick", "a lazy"), max_new_tokens=5)
    assert printed == "".join(f"> {p}\n{c}\n\n" for p, c in completions.items())


def test_library_refusals_are_the_commands_messages(tmp_path, tiny_llama_dir):
    with pytest.raises(DepthcutError, match="give either --drop N"):
        prune_to(model=str(tiny_llama_dir), out=str(tmp_path / "x"))
    with pytest.raises(DepthcutError, match="nothing to evaluate"):
        evaluate_to(model=str(tiny_llama_dir), out=str(tmp_path / "e.json"))
    with pytest.raises(TypeError, match="expected a PruneConfig"):
        prune_to(AnalyzeConfig(model="m", data="d", out="o"))
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("name,config_class", [(c[0], c[1]) for c in COMMANDS])
def test_command_line_defaults_are_the_configs_defaults(name, config_class):
    """Parsing only the required arguments gives the config's own defaults: each is written once."""
    command = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    required = []
    for action in command._actions:
        if not action.option_strings and action.dest != "help":
            required.append("x")
        elif action.required:
            required += [action.option_strings[0], "x"]
    parsed = config_from_args(config_class, command.parse_args(required))
    for field in dataclasses.fields(config_class):
        if field.default is not dataclasses.MISSING:
            assert getattr(parsed, field.name) == field.default, field.name
        assert field.metadata.get("help"), f"{name}: {field.name} has no help text"


def test_options_from_fields():
    @dataclasses.dataclass(kw_only=True)
    class Example:
        path: str = option(positional=True, help="where")
        count: int = option(3, help="how many")
        names: tuple[str, ...] = option(("a",), parse=comma_list, help="which")
        fast: bool = option(False, help="hurry")
        limit: int | None = option(None, group="limits", exclusive="budget", help="at most")
        tokens: int | None = option(None, group="limits", exclusive="budget", help="or tokens")

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Example)
    config = config_from_args(Example, parser.parse_args(["p", "--count", "5", "--names", "x, y,", "--fast"]))
    assert config == Example(path="p", count=5, names=("x", "y"), fast=True)
    assert "how many (default: 3)" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["p", "--limit", "1", "--tokens", "2"])


def test_prune_with_a_repair_folds_it_and_records_its_fit(tmp_path, tiny_llama_dir, corpus_file):
    # 32 windows of 16 tokens to fit a 32 x 32 map (8 held out): enough that it generalizes; judged on the
    # corpus's held-out documents alone (on WikiText the tiny tokenizer's model is noise)
    argv = ["prune", str(tiny_llama_dir), "--layers", "2:4", "--repair", "lstsq", "--data", str(corpus_file),
            "--validate", str(corpus_file), *SMALL_ARGS, "--samples", "32"]
    assert main([*argv, "--out", str(tmp_path / "cli")]) == 0
    result = prune_to(model=str(tiny_llama_dir), layers="2:4", repair="lstsq", data=str(corpus_file),
                      validate=(str(corpus_file),), out=str(tmp_path / "lib"), **{**SMALL, "samples": 32})
    assert result.provenance["repair"]["applied"], result.provenance["repair"]["validation"]["why"]
    assert_same_outputs(tmp_path / "cli", tmp_path / "lib")
    fit = result.provenance["repair"]
    assert fit["method"] == "lstsq" and fit["block"] == [2, 4]
    assert fit["relative_error_after"] < fit["relative_error_before"]
    assert fit["relative_error_heldout_after"] < fit["relative_error_heldout_before"]  # on documents the fit never saw
    assert fit["heldout_tokens"] > 0 and fit["heldout_samples"] == 8
    # In the stored dtype, the repaired model differs from the plainly pruned one in one tensor only.
    prune_to(model=str(tiny_llama_dir), layers="2:4", repair="lstsq", data=str(corpus_file), dtype="float32",
             validate=(str(corpus_file),), out=str(tmp_path / "repaired32"), **{**SMALL, "samples": 32})
    plain = prune_to(model=str(tiny_llama_dir), layers="2:4", out=str(tmp_path / "plain"))
    from safetensors.torch import load_file

    repaired, unrepaired = load_file(tmp_path / "repaired32" / "model.safetensors"), load_file(
        tmp_path / "plain" / "model.safetensors")
    changed = [name for name in repaired if not (repaired[name] == unrepaired[name]).all()]
    assert changed == ["model.layers.1.mlp.down_proj.weight"]  # T folded into the last kept MLP, nothing else
    assert plain.provenance["repair"] is None


def test_a_repair_that_cannot_be_folded_is_refused_with_nothing_written(capsys, tmp_path, tiny_llama_dir,
                                                                        corpus_file):
    code = main(["prune", str(tiny_llama_dir), "--layers", "0:2", "--repair", "lstsq", "--data", str(corpus_file),
                 "--out", str(tmp_path / "x"), *SMALL_ARGS])
    err = capsys.readouterr().err
    assert code == 2 and "layer 0" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("method", ["lstsq", "cosine", "magnitude"])
def test_a_streamed_prune_with_a_repair_equals_the_in_memory_one(tmp_path, tiny_llama_dir, corpus_file, method):
    """--stream --repair: the statistics gathered one layer at a time (fitted and held-out samples in
    one pass), only the tensors the fold changes read and rewritten, every other one copied; the
    result is the in-memory repair's, tensor for tensor."""
    from safetensors.torch import load_file

    # warn: in memory the fit is folded whether or not it beats the plain cut (streamed is not validated)
    options = dict(model=str(tiny_llama_dir), layers="2:4", repair=method, data=str(corpus_file), dtype="float32",
                   repair_policy="warn", **{**SMALL, "samples": 32})
    streamed = prune_to(**options, stream=True, out=str(tmp_path / "streamed"))
    in_memory = prune_to(**options, out=str(tmp_path / "in-memory"))
    assert streamed.provenance["backend"] == "shard_by_shard" and in_memory.provenance["backend"] == "in_memory"
    ours, reference = streamed.provenance["repair"], in_memory.provenance["repair"]
    for key in ("relative_error_before", "relative_error_after", "relative_error_heldout_before",
                "relative_error_heldout_after"):
        assert ours[key] == pytest.approx(reference[key], rel=1e-5), key
    assert ours["tokens"] == reference["tokens"] and ours["heldout_tokens"] == reference["heldout_tokens"]
    a, b = load_file(tmp_path / "streamed" / "model.safetensors"), load_file(tmp_path / "in-memory" / "model.safetensors")
    assert set(a) == set(b)
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-5, atol=1e-6), name
    original = load_file(tiny_llama_dir / "model.safetensors")
    expected = {"lstsq": 1, "cosine": 1, "magnitude": 1 + 2 * 2}[method]  # magnitude: embeddings + 2 writers a layer
    assert len(ours["changed_tensors"]) == expected
    unchanged = [n for n in a if n.startswith("model.layers.0.") and "down_proj" not in n and "o_proj" not in n]
    assert all(torch.equal(a[n], original[n]) for n in unchanged)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed")
    assert model.config.num_hidden_layers == 4


def test_prune_says_what_its_repair_did_and_warns_when_it_does_not_carry_to_held_out_text(capsys, tmp_path,
                                                                                          tiny_llama_dir, corpus_file):
    from depthcut.pipeline.prune_repair import repair_lines

    assert main(["prune", str(tiny_llama_dir), "--layers", "2:4", "--repair", "lstsq", "--data", str(corpus_file),
                 "--out", str(tmp_path / "x"), *SMALL_ARGS, "--samples", "32"]) == 0
    printed = capsys.readouterr().out
    fit = json.loads((tmp_path / "x" / "depthcut.json").read_text())["repair"]
    assert (f"repair lstsq: relative error at the cut {fit['relative_error_before']:.4f} -> "
            f"{fit['relative_error_after']:.4f} on {fit['tokens']:,} calibration tokens") in printed
    assert f"{fit['relative_error_heldout_after']:.4f} on {fit['heldout_tokens']:,} held-out tokens" in printed
    assert "warning" not in printed  # 32 windows fit the 32 x 32 map well (see above)
    worse = {**fit, "relative_error_heldout_after": fit["relative_error_heldout_before"] * 1.5}
    assert repair_lines(worse)[-1].startswith("warning: on held-out text the repair does no better")
    assert repair_lines(None) == []
