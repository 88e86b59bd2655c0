"""`prune --repair` judged on the model's output: a repair is folded in only where its validation KL
beats the plain cut's beyond the noise; otherwise --repair-policy keeps the plain cut (default),
warns and writes the repair, or refuses."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from depthcut.cli import main
from depthcut.pipeline import prune_to

SMALL = {"samples": 16, "seq_len": 32, "validation_windows": 8, "dtype": "float32", "quiet": True}


def _weights(folder):
    return load_file(folder / "model.safetensors")


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[name], b[name]) for name in a)


def test_a_repair_that_helps_is_validated_and_applied(tmp_path, tiny_llama_dir, corpus_file):
    plain = prune_to(model=str(tiny_llama_dir), layers="2:4", out=str(tmp_path / "plain"), **SMALL)
    result = prune_to(model=str(tiny_llama_dir), layers="2:4", repair="lstsq", data=str(corpus_file),
                      validate=(str(corpus_file),), out=str(tmp_path / "lstsq"), **SMALL)
    fit = result.provenance["repair"]
    validation = fit["validation"]
    source = str(corpus_file)
    assert validation["plain"][source]["windows"] == validation["repaired"][source]["windows"] > 1
    # the repaired KL is lower, and the decision follows the rule as the numbers give it
    gain = validation["plain"][source]["kl"] - validation["repaired"][source]["kl"]
    assert fit["applied"] == validation["beats_plain"] and (gain > 0) == validation["beats_plain"]
    assert validation["beats_plain"], validation["why"]  # on the tiny Llama, lstsq at [2, 4) helps clearly
    assert not _same(_weights(tmp_path / "lstsq"), _weights(tmp_path / "plain"))
    assert plain.provenance["repair"] is None


@pytest.mark.parametrize("policy", ["keep", "warn", "refuse"])
def test_a_repair_not_shown_to_help_follows_the_policy(capsys, tmp_path, tiny_llama_dir, corpus_file, policy):
    """A margin no repair can beat: keep writes exactly the plain cut, warn the repair (as an
    unvalidated repair writes it), refuse nothing."""
    args = ["prune", str(tiny_llama_dir), "--layers", "2:4", "--samples", "16", "--seq-len", "32",
            "--validation-windows", "8", "--dtype", "float32", "--quiet", "--data", str(corpus_file)]
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    # the repair folded whatever the validation says: warn applies it (the fit does not depend on the margin)
    assert main([*args, "--repair", "lstsq", "--margin", "0", "--repair-policy", "warn",
                 "--out", str(tmp_path / "applied")]) == 0
    assert not _same(_weights(tmp_path / "applied"), _weights(tmp_path / "plain"))
    capsys.readouterr()
    out = tmp_path / policy
    code = main([*args, "--repair", "lstsq", "--margin", "1e9", "--repair-policy", policy, "--out", str(out)])
    captured = capsys.readouterr()
    if policy == "refuse":
        assert code == 2 and "does no better than the plain cut" in captured.err and not out.exists()
        return
    assert code == 0
    record = json.loads((out / "depthcut.json").read_text())["repair"]
    assert record["validation"]["beats_plain"] is False and record["applied"] == (policy == "warn")
    expected = tmp_path / ("applied" if policy == "warn" else "plain")
    assert _same(_weights(out), _weights(expected))
    assert ("NOT applied" in captured.out) == (policy == "keep") and ("warning: repair" in captured.out) == (
        policy == "warn")
    card = (out / "README.md").read_text()
    assert ("fitted but not applied" in card) == (policy == "keep")
