"""`depthcut shrink --search greedy`: known answers on tiny models with planted redundant layers at
scattered positions, the architecture's refusals obeyed at every step, and the search's cut in the
decision table."""

from __future__ import annotations

import copy

import pytest
import torch
from architectures import tiny_config
from tiny import tiny_model

from depthcut.analysis.calibration import build_calibration
from depthcut.errors import DepthcutError
from depthcut.io.data import load_texts
from depthcut.model.surgery import remove_layers
from depthcut.pipeline.configs import ShrinkConfig
from depthcut.pipeline.shrink import shrink_to
from depthcut.pipeline.shrink_search import greedy_search

PLANTED = [1, 4, 6]


def _planted_llama():
    """A tiny 8-layer Llama whose layers 1, 4 and 6 write nothing into the residual stream (their output
    projections zeroed): removing them changes nothing; every other layer does work (weights scaled up)."""
    model = tiny_model("llama", num_hidden_layers=8).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.mul_(3.0)
        for index in PLANTED:
            model.model.layers[index].self_attn.o_proj.weight.zero_()
            model.model.layers[index].mlp.down_proj.weight.zero_()
    return model


def _windows(tokenizer, corpus_file, count: int = 4):
    return {"text": build_calibration(tokenizer, load_texts(str(corpus_file)), count, 24, "windows", 7)}


def test_the_greedy_search_finds_planted_scattered_layers(tokenizer, corpus_file):
    model = _planted_llama()
    config = ShrinkConfig(model="m", out="o", drop=3, screen_windows=4, batch_size=4)
    path = greedy_search(model, _windows(tokenizer, corpus_file), 3, config)
    assert sorted(path.order) == PLANTED
    assert all(step["kl"] < 1e-6 for step in path.steps)  # each removal changed nothing
    assert path.trials == 7 + 6 + 5  # every layer but the final one, then those left
    # the model is whole after every trial
    assert len(model.model.layers) == 8 and model.config.num_hidden_layers == 8
    # no contiguous block of 3 is the planted cut, and each of them changes the output
    reference = copy.deepcopy(model)
    remove_layers(reference, [4, 5, 6])
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        assert not torch.allclose(reference(ids).logits, model(ids).logits, atol=1e-3)


def test_the_search_never_proposes_a_cut_the_architecture_refuses(tokenizer, corpus_file):
    """A hybrid with one attention layer, that layer planted as the most redundant: removing it would
    leave no attention layer (refused), so the search passes it over at every step."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("lfm2")
    config.layer_types = ["conv"] * 3 + ["full_attention"] + ["conv"] * 4
    config.full_attn_idxs = [3]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.model.layers[3].self_attn.out_proj.weight.zero_()
        model.model.layers[3].feed_forward.w2.weight.zero_()
    with pytest.raises(DepthcutError):
        remove_layers(copy.deepcopy(model), [3])
    shrink = ShrinkConfig(model="m", out="o", drop=3, screen_windows=2, batch_size=2)
    path = greedy_search(model, _windows(tokenizer, corpus_file, 2), 3, shrink)
    assert len(path.order) == 3 and 3 not in path.order
    for step in range(1, 4):  # every prefix of the order is a cut the model allows
        remove_layers(copy.deepcopy(model), path.order[:step])


def test_shrink_takes_the_search_cut_as_a_candidate(tmp_path, tokenizer, corpus_file):
    folder = tmp_path / "planted"
    _planted_llama().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    result = shrink_to(model=str(folder), drop=3, data=str(corpus_file), validate=(str(corpus_file),),
                       repairs=("none",), samples=16, seq_len=24, validation_windows=6, screen_windows=3,
                       dtype="float32", quiet=True, search="greedy", out=str(tmp_path / "small"))
    selection = result.provenance["selection"]
    assert sorted(selection["search"]["order"]) == PLANTED and len(selection["search"]["steps"]) == 3
    winner = selection["winner"]
    assert winner["layers"] == PLANTED and result.removed == PLANTED
    rows = {(tuple(r["layers"]), r["found_by"]) for r in selection["options"]}
    # Block Influence sees the planted layers too; the search's cut is then the same candidate, said so
    assert (tuple(PLANTED), "greedy") in rows or "proposes already" in selection["search"]["why"]
    none = shrink_to(model=str(folder), drop=3, data=str(corpus_file), validate=(str(corpus_file),),
                     repairs=("none",), samples=16, seq_len=24, validation_windows=6, screen_windows=3,
                     dtype="float32", quiet=True, out=str(tmp_path / "no-search"))  # the default
    assert none.provenance["selection"]["search"] == {"method": "none"}
    assert all(r["found_by"] != "greedy" for r in none.provenance["selection"]["options"])
