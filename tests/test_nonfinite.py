"""Non-finite weights are refused, not measured: one NaN in one weight turned every distance after its
layer into NaN (exit 0), and `--strategy angular` then picked the only finite entry. The analysis now
names the first layer whose output is not finite in memory, and the tensor as it is read layer by
layer; `prune` refuses a NaN in a tensor it would write (in memory, shard by shard, GGUF), the repairs
one in what they fit on, and nothing is written. A NaN in a layer that is removed is not copied, and
not refused."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model

from depthcut import analyze
from depthcut.cli import main
from depthcut.errors import DepthcutError


def _poisoned(layer: int = 3):
    model = tiny_model("llama").eval()
    with torch.no_grad():
        model.model.layers[layer].mlp.down_proj.weight[0, 0] = float("nan")
    return model


TEXTS = ["the quick brown fox jumps over the lazy dog " * 6] * 8


def test_the_analysis_names_the_first_layer_whose_output_is_not_finite(tokenizer):
    with pytest.raises(DepthcutError, match=r"decoder layer 3's output holds NaN or infinite values"):
        analyze(_poisoned(3), tokenizer, TEXTS, samples=4, seq_len=16, batch_size=2)
    model = tiny_model("llama").eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(float("inf"))
    with pytest.raises(DepthcutError, match="the embeddings hold|the embeddings holds"):
        analyze(model, tokenizer, TEXTS, samples=4, seq_len=16, batch_size=2)
    # a finite model is measured as before
    assert analyze(tiny_model("llama").eval(), tokenizer, TEXTS, samples=4, seq_len=16, batch_size=2).best_block(2)


@pytest.mark.parametrize("command", ["prune", "analyze"], ids=["prune in memory", "analyze layer by layer"])
def test_a_model_with_a_nan_weight_is_refused_and_nothing_is_written(capsys, tmp_path, tokenizer, corpus_file,
                                                                     command):
    folder = tmp_path / "poisoned"
    _poisoned(2).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    capsys.readouterr()  # save_pretrained's own progress bar
    out = tmp_path / "out"
    argv = [command, str(folder), "--data", str(corpus_file), "--samples", "4", "--seq-len", "16", "--dtype",
            "float32", "--quiet", "--out", str(out)]
    code = main([*argv, "--drop", "2"] if command == "prune" else [*argv, "--stream"])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    expected = ("decoder layer 2's output holds NaN" if command == "prune" else
                f"model.layers.2.mlp.down_proj.weight of {folder / 'model.safetensors'} holds 1 NaN or infinite value")
    assert code == 2 and expected in last and "Traceback" not in err, err
    assert not out.exists()


def _poisoned_folder(tmp_path, tokenizer, layer: int):
    folder = tmp_path / "poisoned"
    _poisoned(layer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("stream", [False, True], ids=["in memory", "shard by shard"])
def test_prune_refuses_a_nan_in_a_tensor_it_would_write_and_writes_nothing(capsys, tmp_path, tokenizer, stream):
    folder = _poisoned_folder(tmp_path, tokenizer, 3)
    capsys.readouterr()
    out = tmp_path / "out"
    # --layers: no analysis runs, so only the copy can see the NaN (both wrote it, exit 0)
    code = main(["prune", str(folder), "--layers", "1", "--out", str(out), "--dtype", "checkpoint",
                 *(["--stream"] if stream else [])])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    # shard by shard, named as stored; in memory, as the pruned model calls it (layer 3 is its layer 2)
    named = (f"tensor 'model.layers.3.mlp.down_proj.weight' of {folder / 'model.safetensors'}" if stream else
             "model.layers.2.mlp.down_proj.weight of the pruned model (as loaded in its --dtype, and repaired)")
    assert code == 2 and f"{named} holds 1 NaN or infinite value(s)" in last, last
    assert "does not prune a model whose weights are not finite" in last, last
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    # the same NaN in the layer removed: nothing of it is written, so nothing is refused
    assert main(["prune", str(folder), "--layers", "3", "--out", str(out), "--dtype", "checkpoint",
                 *(["--stream"] if stream else [])]) == 0, capsys.readouterr().err
    from safetensors.torch import load_file

    assert all(bool(t.isfinite().all()) for t in load_file(out / "model.safetensors").values())


def test_a_repair_refuses_to_fit_on_non_finite_statistics(capsys, tmp_path, tokenizer, corpus_file):
    folder = _poisoned_folder(tmp_path, tokenizer, 1)  # before the cut: the activations it fits on are NaN
    capsys.readouterr()
    out = tmp_path / "out"
    code = main(["prune", str(folder), "--layers", "3:5", "--repair", "lstsq", "--data", str(corpus_file),
                 "--samples", "4", "--seq-len", "16", "--dtype", "float32", "--quiet", "--out", str(out)])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "the repair statistics of layers 3-4 hold NaN or infinite values" in last, last
    assert not out.exists()


def test_a_gguf_with_a_nan_in_a_float_tensor_is_not_copied(tmp_path):
    gguf = pytest.importorskip("gguf")
    from test_gguf import write_tiny_gguf

    from depthcut.model.gguf_surgery import prune_gguf

    source = write_tiny_gguf(_poisoned(2), tmp_path / "poisoned.gguf", gguf.GGMLQuantizationType.F32)
    out = tmp_path / "out.gguf"
    with pytest.raises(DepthcutError, match=r"tensor 'blk.2.ffn_down.weight' of .*poisoned.gguf holds 1 NaN or "
                                            r"infinite value\(s\)"):
        prune_gguf(source, out, [0])
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["poisoned.gguf"]
    prune_gguf(source, out, [2])  # the layer that holds it removed: written
    assert out.is_file()


@pytest.mark.parametrize("stream", [False, True], ids=["in memory", "layer by layer"])
def test_shrink_refuses_a_model_with_a_nan_weight_and_writes_nothing(capsys, tmp_path, tokenizer, corpus_file, stream):
    folder = _poisoned_folder(tmp_path, tokenizer, 2)
    capsys.readouterr()
    out = tmp_path / "out"
    code = main(["shrink", str(folder), "--drop", "1", "--data", str(corpus_file), "--samples", "4", "--seq-len", "16",
                 "--candidates", "1", "--repairs", "none", "--dtype", "float32", "--quiet", "--out", str(out),
                 *(["--stream"] if stream else [])])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    expected = (f"model.layers.2.mlp.down_proj.weight of {folder / 'model.safetensors'} holds 1 NaN" if stream else
                "decoder layer 2's output holds NaN")
    assert code == 2 and expected in last, last
    assert not out.exists()
