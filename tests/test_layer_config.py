"""The config rules for layers (depthcut.model.layer_fields), the kind check (depthcut.model.layer_kinds), and
how a strategy chooses among the cuts an architecture allows, against known answers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

import depthcut
from depthcut.analysis.result import Analysis
from depthcut.model.layer_fields import rewrite_layer_fields
from depthcut.model.layer_kinds import kind_preserving_blocks, layer_kinds
from depthcut.strategies import select_allowed


class _Config:
    """A bare config object: the rules read and write plain attributes."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


@pytest.mark.parametrize("fields, expected", [
    # per-layer sequences are sliced (a string one character per layer too)
    ({"layer_types": list("abcdef")}, {"layer_types": list("acdf")}),
    ({"hybrid_override_pattern": "M*M-M*"}, {"hybrid_override_pattern": "MM-*"}),
    # index lists are renumbered onto kept layers 0,2,3,5 -> 0,1,2,3
    ({"mlp_only_layers": [1, 2, 5]}, {"mlp_only_layers": [1, 3]}),
    # leading counts are recounted: layers 0 and 2 were below 3
    ({"first_k_dense_replace": 3}, {"first_k_dense_replace": 2}),
    # a last index: 0, 2, 3 are at most 3 -> the new last index is 2
    ({"moe_layer_end_index": 3}, {"moe_layer_end_index": 2}),
    # Qwen2-MoE's step becomes the explicit list: sparse were 1, 3, 5 -> kept 3, 5 at 2, 3
    ({"decoder_sparse_step": 2, "mlp_only_layers": []}, {"decoder_sparse_step": 1, "mlp_only_layers": [0, 1]}),
    # multi-token-prediction layers are not loaded, so not written in memory
    ({"num_nextn_predict_layers": 1}, {"num_nextn_predict_layers": 0}),
])
def test_config_rules_against_known_answers(fields, expected):
    cfg = _Config(num_hidden_layers=6, **fields)
    rewrite_layer_fields(cfg, [0, 2, 3, 5], 6)
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert cfg.num_hidden_layers == 4


@pytest.mark.parametrize("fields, message", [
    ({"dense_every_other_layer_offset": 1}, "dense_every_other_layer_offset"),
    ({"block_kinds": ["a", "b", "a", "b", "a", "b"]}, "block_kinds"),  # one entry per layer, unknown name
    ({"layer_types": ["a", "b"]}, "2 entries for 6 layers"),
    ({"num_kv_shared_layers": 2}, "reuse the KV cache"),
])
def test_fields_that_cannot_be_rewritten_are_refused(fields, message):
    cfg = _Config(num_hidden_layers=6, **fields)
    with pytest.raises(depthcut.DepthcutError, match=message):
        rewrite_layer_fields(cfg, [0, 2, 3, 5], 6)
    assert cfg.num_hidden_layers == 6


def test_fields_that_only_look_like_layer_fields_pass():
    cfg = _Config(num_hidden_layers=6, time_step_rank=4, image_token_index=5, block_size=4, model_type="abcdef",
                  layer_norm_eps=1e-5, num_random_blocks=3)
    rewrite_layer_fields(cfg, [0, 1], 6)
    assert cfg.time_step_rank == 4 and cfg.model_type == "abcdef"


def test_kind_preserving_blocks_of_a_period():
    # kinds repeat every 2 layers (a b a b a b a b): only even-length blocks keep every kind
    signatures = [("a",), ("b",)] * 4
    assert kind_preserving_blocks(signatures, 1) == []
    assert kind_preserving_blocks(signatures, 2) == [(0, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7)][::1][:6]


def _jamba():
    from architectures import build_tiny

    return build_tiny("jamba")


def test_jamba_cut_that_shifts_kinds_is_refused_with_blocks_that_work():
    model = _jamba()  # attention at 2 and 6, experts at odd layers
    assert layer_kinds(model) == ["ssm+mlp", "ssm+moe", "attn+mlp", "ssm+moe"] * 2
    with pytest.raises(depthcut.DepthcutError, match=r"layer 4 would be rebuilt at position 3 as another kind"):
        depthcut.prune(model, [3])  # every later layer moves by one: with a period of 2 no single layer can go
    with pytest.raises(depthcut.DepthcutError, match=r"another kind of layer.*blocks of 2 that keep every layer's "
                                                     r"kind here: 5:7$") as error:
        depthcut.prune(model, [4, 5])
    assert "\n" not in str(error.value)
    assert len(model.model.layers) == 8  # left as it was
    with pytest.raises(depthcut.DepthcutError, match="every attn layer"):
        depthcut.prune(model, [2, 6])


def test_angular_takes_the_best_allowed_block_and_says_what_it_passed_over():
    size = 8
    matrix = [[0.5] * (size + 1) for _ in range(size + 1)]
    matrix[1][3] = 0.1  # block [3, 5) best
    matrix[1][4] = 0.2  # then [4, 6)
    analysis = Analysis(num_layers=size, metrics={"angular_last_token": matrix})
    allowed = {(4, 5)}
    layers, skipped = select_allowed("angular", 2, size, analysis, 0,
                                     lambda layers: None if tuple(layers) in allowed else "not allowed")
    assert layers == [4, 5] and skipped == [([3, 4], "not allowed")]
    with pytest.raises(depthcut.DepthcutError, match="no cut of 2 layers that this model allows"):
        select_allowed("angular", 2, size, analysis, 0, lambda layers: "never")


def test_deepest_moves_up_to_the_deepest_allowed_block(tmp_path, tokenizer):
    """Jamba with --drop 2 --strategy deepest: [5, 7) keeps every kind, and the pruned model is the
    original with those layers bypassed; with --drop 1 no layer can go, and the refusal says why."""
    from architectures import bypassed_logits, random_ids

    from depthcut.pipeline.prune import prune_to

    model = _jamba()
    model.save_pretrained(tmp_path / "jamba")
    tokenizer.save_pretrained(tmp_path / "jamba")
    result = prune_to(model=str(tmp_path / "jamba"), drop=2, strategy="deepest", out=str(tmp_path / "out"), quiet=True)
    assert result.removed == [5, 6]
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = random_ids()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, use_cache=False).logits, bypassed_logits(model, [5, 6], ids),
                                   rtol=1e-4, atol=1e-4)
    with pytest.raises(depthcut.DepthcutError, match="found no cut of 1 layers that this model allows"):
        prune_to(model=str(tmp_path / "jamba"), drop=1, strategy="deepest", out=str(tmp_path / "one"), quiet=True)
    assert not (tmp_path / "one").exists()


def _with_field(source, target, **fields):
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config.update(fields)
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.slow
def test_cli_refuses_an_unknown_layer_field_in_one_line_and_allow_goes_on(tiny_llama_dir, tmp_path, stream):
    folder = _with_field(tiny_llama_dir, tmp_path / "model", moe_every_k_layers_offset=1)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "depthcut.cli", "prune", str(folder), "--layers", "2", "--out", str(out)]
    command += ["--stream"] if stream else []
    refused = subprocess.run(command, capture_output=True, text=True)
    assert refused.returncode == 2, refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith("depthcut: error")]
    assert len(errors) == 1 and "moe_every_k_layers_offset" in errors[0]
    assert not out.exists()
    allowed = subprocess.run(command + ["--allow-unknown-config", "moe_every_k_layers_offset"], capture_output=True,
                             text=True)
    assert allowed.returncode == 0, allowed.stderr
    record = json.loads((out / "depthcut.json").read_text())
    assert record["config_rewrite"]["allowed_unknown"] == ["moe_every_k_layers_offset"]
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 5
