import copy

import pytest
import torch
from reference import bypass_layers
from tiny import CONFIGS, random_ids, tiny_model, tolerance
from transformers import AutoModelForCausalLM

import depthcut
from depthcut.model.layers import find_layer_stack, text_config
from depthcut.model.surgery import parse_layer_spec

# A contiguous block and a scattered set, both keeping the final layer; one drops layer 0.
REMOVALS = {"block": [2, 3, 4], "scattered": [0, 3]}


def _layer_params(layer) -> int:
    return sum(p.numel() for p in layer.parameters())


@pytest.mark.parametrize("removal", sorted(REMOVALS))
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_pruned_model_reloads_and_matches_reference(arch, removal, tmp_path, device):
    removed = REMOVALS[removal]
    original = tiny_model(arch)
    stack = find_layer_stack(original)
    types_before = getattr(text_config(original), "layer_types", None)
    expected_drop = sum(_layer_params(stack.layers[i]) for i in removed)
    params_before = sum(p.numel() for p in original.parameters())

    pruned = depthcut.prune(copy.deepcopy(original).to(device), removed)
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).to(device).eval()

    kept = [i for i in range(len(stack)) if i not in removed]
    config = text_config(reloaded)
    assert config.num_hidden_layers == len(kept) == len(find_layer_stack(reloaded))
    if types_before is not None:
        assert list(config.layer_types) == [types_before[i] for i in kept]
    assert sum(p.numel() for p in reloaded.parameters()) == params_before - expected_drop

    ids = random_ids(batch=2, length=12)
    handles = bypass_layers(original, stack, removed)
    try:
        with torch.no_grad():
            expected = original(input_ids=ids, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        actual = reloaded(input_ids=ids.to(device), use_cache=False).logits.cpu()
    tol = tolerance(device, 1e-5, 1e-4)
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)

    # Both the in-memory result (as a notebook uses it) and the reloaded one generate with a cache.
    for model in (pruned, reloaded):
        _assert_cached_generation_matches_uncached(model)


def _assert_cached_generation_matches_uncached(model):
    prompt = random_ids(batch=1, length=6, seed=7).to(model.device)
    settings = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    cached = model.generate(prompt, use_cache=True, **settings)
    uncached = model.generate(prompt, use_cache=False, **settings)
    assert cached.tolist() == uncached.tolist()
    assert cached.shape[1] == 16


def test_layer_idx_is_renumbered_so_the_cache_uses_the_right_slots():
    model = depthcut.prune(tiny_model("llama"), [1, 2])
    indices = [layer.self_attn.layer_idx for layer in model.model.layers]
    assert indices == [0, 1, 2, 3]


def test_leading_count_fields_are_recounted():
    # Qwen2: layers below max_window_layers slide; kept 1,2,4,5 -> two of them are below 3.
    model = depthcut.prune(tiny_model("qwen2", max_window_layers=3), [0, 3])
    assert model.config.max_window_layers == 2


def test_an_unknown_layer_field_refuses_the_cut_and_leaves_the_model_as_it_was():
    model = tiny_model("llama")
    model.config.dense_every_other_layer_offset = 1  # means nothing to Llama, and nothing to depthcut
    with pytest.raises(depthcut.DepthcutError, match="dense_every_other_layer_offset.*--allow-unknown-config"):
        depthcut.prune(model, [2])
    assert len(model.model.layers) == 6 and model.config.num_hidden_layers == 6
    depthcut.prune(model, [2], allow_unknown_config=["dense_every_other_layer_offset"])
    assert len(model.model.layers) == 5 and model.config.dense_every_other_layer_offset == 1


def test_index_list_fields_are_renumbered():
    model = tiny_model("llama")
    model.config.mlp_only_layers = [1, 3, 5]
    depthcut.prune(model, [0, 3])
    # kept layers 1,2,4,5 -> 0,1,2,3; layer 3 is gone
    assert model.config.mlp_only_layers == [0, 3]


@pytest.mark.parametrize(
    "spec, expected",
    [("21:29", list(range(21, 29))), ("3,7,12", [3, 7, 12]), ("0:2,5", [0, 1, 5]), (" 4 , 2 ", [2, 4])],
)
def test_layer_spec_parsing(spec, expected):
    assert parse_layer_spec(spec, 30) == expected


@pytest.mark.parametrize(
    "spec, message",
    [
        ("29:31", "out of range"),
        ("-1", "out of range"),
        ("5:5", "half-open"),
        ("a,b", "malformed"),
        ("3,,4", "empty item"),
        ("3,3", "more than once"),
        ("0:30", "cannot remove all"),
    ],
)
def test_layer_spec_errors(spec, message):
    with pytest.raises(depthcut.DepthcutError, match=message):
        parse_layer_spec(spec, 30)


def test_ambiguous_layer_stack_lists_candidates_and_accepts_a_path():
    model = tiny_model("llama")
    model._no_split_modules = []
    model.model.shadow = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(6)])
    with pytest.raises(depthcut.DepthcutError) as error:
        find_layer_stack(model)
    assert "model.layers" in str(error.value) and "model.shadow" in str(error.value)
    assert find_layer_stack(model, "model.layers").path == "model.layers"
    with pytest.raises(depthcut.DepthcutError, match="no module at layer path"):
        find_layer_stack(model, "model.nothing")


@pytest.mark.parametrize("arch, path", [("gpt2", "transformer.h"), ("opt", "model.decoder.layers"),
                                        ("gpt_neox", "gpt_neox.layers"), ("gemma3_vl", "model.language_model.layers"),
                                        ("falcon", "transformer.h")])
def test_layer_stack_discovery(arch, path):
    assert find_layer_stack(tiny_model(arch)).path == path
