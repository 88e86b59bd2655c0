"""Non-finite weights are refused, not measured: one NaN in one weight turned every distance after its
layer into NaN (exit 0), and `--strategy angular` then picked the only finite entry. The analysis now
names the first layer whose output is not finite, in memory and layer by layer, and nothing is written."""

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
    assert code == 2 and "decoder layer 2's output holds NaN" in last and "Traceback" not in err, err
    assert not out.exists()
