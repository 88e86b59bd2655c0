"""Trial cuts without a copy of the model (`layers_removed`, `repair_folded`): inside the block the model
computes exactly what a deep copy cut by `remove_layers` (and repaired by `apply_repair`) computes, and
after it the model is whole again: the same logits, weights, config and layer indices. And `depthcut
shrink` no longer copies the model to score its options."""

from __future__ import annotations

import copy

import pytest
import torch
from architectures import build_tiny
from tiny import random_ids, tiny_model

from depthcut.errors import DepthcutError
from depthcut.model.layers import find_layer_stack, text_config
from depthcut.model.surgery import layers_removed, remove_layers
from depthcut.repair import apply_repair, repair, repair_folded

# (builder, name, a cut every one of them allows): dense, sliding/full mixes, MoE, hybrid SSM + attention
FAMILIES = [
    (tiny_model, "llama", [1, 2]),
    (tiny_model, "gemma3", [2, 3]),
    (tiny_model, "gpt2", [0, 4]),
    (build_tiny, "qwen2_moe", [2, 3, 4, 5]),
    (build_tiny, "mixtral", [3]),
    (build_tiny, "jamba", [2, 3, 4, 5]),
]


def _snapshot(model) -> dict:
    stack = find_layer_stack(model)
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "config": copy.deepcopy(text_config(model).to_dict()),
            "layers": list(stack.layers),
            "indices": [getattr(sub, "layer_idx", None) for layer in stack.layers for sub in layer.modules()]}


def _as_it_is(model, ids) -> tuple[torch.Tensor, dict]:
    """(its logits on `ids`, its snapshot): what it must come back to."""
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits, _snapshot(model)


def _assert_whole(model, before: dict, ids, logits) -> None:
    after = _snapshot(model)
    assert after["layers"] == before["layers"] and all(a is b for a, b in zip(after["layers"], before["layers"]))
    assert after["indices"] == before["indices"] and after["config"] == before["config"]
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], before["state"][k]) for k in before["state"])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, use_cache=False).logits, logits)


@pytest.mark.parametrize(("build", "name", "cut"), FAMILIES, ids=[name for _, name, _ in FAMILIES])
def test_a_cut_for_the_block_equals_a_copy_cut_for_good_and_leaves_the_model_whole(build, name, cut):
    model = build(name).eval()
    ids = random_ids()
    original, before = _as_it_is(model, ids)
    reference = copy.deepcopy(model)
    remove_layers(reference, cut)
    with torch.no_grad():
        expected = reference(input_ids=ids, use_cache=False).logits
        with layers_removed(model, cut) as rewrite:
            inside = model(input_ids=ids, use_cache=False).logits
            assert len(find_layer_stack(model)) == len(find_layer_stack(reference))
            assert text_config(model).to_dict() == text_config(reference).to_dict()
    assert rewrite.changed or text_config(reference).num_hidden_layers == len(before["layers"]) - len(cut)
    assert torch.equal(inside, expected)
    assert not torch.equal(inside, original)  # the cut did change what it computes
    _assert_whole(model, before, ids, original)


def test_a_refused_cut_changes_nothing_and_an_error_inside_the_block_still_restores(tmp_path):
    model = tiny_model("llama").eval()
    ids = random_ids()
    original, before = _as_it_is(model, ids)
    with pytest.raises(DepthcutError), layers_removed(model, range(len(before["layers"]))):
        pass  # every layer: refused before anything changes
    _assert_whole(model, before, ids, original)
    with pytest.raises(RuntimeError, match="inside"), layers_removed(model, [2]):
        raise RuntimeError("inside")
    _assert_whole(model, before, ids, original)


def test_a_repair_tried_in_place_equals_a_repaired_copy_and_is_undone(corpus_file):
    from tiny import tiny_tokenizer

    model = tiny_model("llama").eval()
    ids = random_ids()
    original, before = _as_it_is(model, ids)
    fit = repair(model, tiny_tokenizer(), str(corpus_file), [2, 3], "lstsq", samples=8, seq_len=32, fold=False)
    _assert_whole(model, before, ids, original)  # fold=False fits only
    reference = copy.deepcopy(model)
    apply_repair(reference, fit)
    remove_layers(reference, [2, 3])
    with torch.no_grad():
        expected = reference(input_ids=ids, use_cache=False).logits
        with repair_folded(model, fit), layers_removed(model, [2, 3]):
            inside = model(input_ids=ids, use_cache=False).logits
    assert torch.equal(inside, expected)
    _assert_whole(model, before, ids, original)


def test_shrink_scores_every_option_without_copying_the_model(monkeypatch, tmp_path, tiny_llama_dir, corpus_file):
    """No whole-model copy along a shrink with repairs (the heal, which trains its own copy, is not asked)."""
    from torch import nn

    from depthcut.pipeline.shrink import shrink_to

    copies = []
    real = copy.deepcopy

    def counting(value, *args, **kwargs):
        if isinstance(value, nn.Module) and any(True for _ in value.parameters()):
            copies.append(type(value).__name__)
        return real(value, *args, **kwargs)

    monkeypatch.setattr(copy, "deepcopy", counting)
    result = shrink_to(model=str(tiny_llama_dir), drop=2, data=str(corpus_file), repairs=("lstsq", "cosine"),
                       samples=16, seq_len=32, validation_windows=4, dtype="float32", quiet=True,
                       out=str(tmp_path / "small"))
    rows = result.provenance["selection"]["options"]
    assert sum(1 for row in rows if row["validation"] and row["repair"] != "none") >= 2  # repairs were scored
    assert copies == []
