import json

import pytest
import torch
from safetensors import safe_open
from tiny import random_ids, tiny_model
from transformers import AutoModelForCausalLM

import depthcut
from depthcut.cli import main
from depthcut.model.shards import INDEX_FILE, prune_shards


def _tensors(folder):
    index = folder / INDEX_FILE
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    tensors = {}
    for name in files:
        with safe_open(folder / name, "pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})  # noqa: SIM118 (not a dict)
    return tensors


# gemma3_vl: the checkpoint names its layers `language_model.model.layers.N`, the model
# `model.language_model.layers.N` (transformers renames them on load).
@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2", "gemma3_vl"])
def test_streamed_surgery_writes_the_in_memory_result_tensor_for_tensor(tmp_path, arch):
    source = tmp_path / "source"
    tiny_model(arch).save_pretrained(source, max_shard_size="20KB")
    assert (source / INDEX_FILE).is_file()  # really sharded
    removed = [1, 2, 4]

    in_memory = tmp_path / "in-memory"
    depthcut.prune(AutoModelForCausalLM.from_pretrained(source), removed).save_pretrained(in_memory)
    streamed = tmp_path / "streamed"
    streamed.mkdir()
    summary = prune_shards(source, streamed, removed)

    expected, got = _tensors(in_memory), _tensors(streamed)
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    assert summary["num_layers_after"] == 3
    config, reference = (json.loads((d / "config.json").read_text()) for d in (streamed, in_memory))
    for key in ("num_hidden_layers", "n_layer", "layer_types"):
        assert config.get(key) == reference.get(key)
    model = AutoModelForCausalLM.from_pretrained(streamed).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(random_ids()).logits,
                                   AutoModelForCausalLM.from_pretrained(in_memory).eval()(random_ids()).logits)


def test_prune_command_streams_a_sharded_folder(capsys, tmp_path, tokenizer):
    source = tmp_path / "source"
    tiny_model("llama").save_pretrained(source, max_shard_size="20KB")
    tokenizer.save_pretrained(source)
    out = tmp_path / "out"
    assert main(["prune", str(source), "--layers", "2:4", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "shard by shard" in captured.err
    provenance = json.loads((out / "depthcut.json").read_text())
    assert provenance["backend"] == "shard_by_shard" and provenance["removed_layers"] == [2, 3]
    assert (out / "tokenizer.json").is_file() and (out / INDEX_FILE).is_file()
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4


def test_missing_shard_is_reported(capsys, tmp_path):
    source = tmp_path / "source"
    tiny_model("llama").save_pretrained(source, max_shard_size="20KB")
    next(source.glob("model-00002-*.safetensors")).unlink()
    code = main(["prune", str(source), "--layers", "1", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "shards that are missing" in err and not (tmp_path / "out").exists()
