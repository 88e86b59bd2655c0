import copy
import math

import pytest
import torch
from reference import naive_metrics
from tiny import CONFIGS, padded_calibration, tiny_model, tolerance

import depthcut
from depthcut.analysis.calibration import CalibrationSet
from depthcut.model.layers import find_layer_stack


def _calibration(lengths, seed=3) -> CalibrationSet:
    return padded_calibration(lengths, seed)


def _assert_close(actual, expected, tol):
    assert len(actual) == len(expected)
    for a_row, e_row in zip(actual, expected):
        if isinstance(e_row, list):
            assert [a is None for a in a_row] == [e is None for e in e_row]
            for a, e in zip(a_row, e_row):
                if e is not None:
                    assert a == pytest.approx(e, abs=tol)
        else:
            assert a_row == pytest.approx(e_row, abs=tol)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_all_metrics_match_naive_per_sample_computation(arch, device):
    model = tiny_model(arch)
    calibration = _calibration([12, 7, 10, 5, 9])
    sequences = [calibration.input_ids[i, : int(calibration.attention_mask[i].sum())] for i in range(len(calibration))]
    expected = naive_metrics(model, find_layer_stack(model), sequences)  # on the CPU, in float64
    analysis = depthcut.analyze(model.to(device), data=calibration, batch_size=2, progress=False)
    assert analysis.metadata["device"].startswith(device.type)
    for name in ("angular_last_token", "angular_all_tokens", "block_influence"):
        _assert_close(analysis.metrics[name], expected[name], tol=tolerance(device, 2e-5, 1e-4))


def test_matrix_layout_and_best_block(device):
    model = tiny_model("llama", device=device)
    analysis = depthcut.analyze(model, data=_calibration([8, 8, 8]), progress=False)
    size = analysis.num_layers
    matrix = analysis.metrics["angular_last_token"]
    assert len(matrix) == size and all(len(row) == size for row in matrix)
    for n in range(1, size + 1):
        for first in range(size):
            assert (matrix[n - 1][first] is None) == (first + n > size)
    for n in range(1, size):
        first, stop = analysis.best_block(n)
        assert stop - first == n and stop <= size - 1  # never includes the final layer
        allowed = [matrix[n - 1][f] for f in range(size - n)]
        assert matrix[n - 1][first] == min(allowed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models_reduce_in_float32(dtype, device):
    reference = depthcut.analyze(tiny_model("llama"), data=_calibration([10, 10]), progress=False)
    low = depthcut.analyze(tiny_model("llama", device=device).to(dtype), data=_calibration([10, 10]), progress=False)
    for name in ("angular_last_token", "angular_all_tokens"):
        values = [v for row in low.metrics[name] for v in row if v is not None]
        assert all(math.isfinite(v) for v in values)
        _assert_close(low.metrics[name], reference.metrics[name], tol=0.03)
    assert low.metadata["dtype"] == str(dtype).removeprefix("torch.")


def test_fp16_states_whose_squared_norm_overflows_give_the_float32_distances(device):
    model = tiny_model("gpt2", device=device).to(torch.float16)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(600.0)  # |h|^2 > 65504: a norm taken in fp16 would be inf
    calibration = _calibration([10, 10])
    with torch.no_grad():
        states = model(input_ids=calibration.input_ids.to(device), output_hidden_states=True).hidden_states
    assert all(torch.isinf((state * state).sum(dim=-1)).any() for state in states[:-1])  # the premise holds
    reference = depthcut.analyze(copy.deepcopy(model).float(), data=calibration, progress=False)
    analysis = depthcut.analyze(model, data=calibration, progress=False)
    for name in ("angular_last_token", "angular_all_tokens"):
        expected = reference.metrics[name]
        assert sum(v is not None for row in expected for v in row) == 6 * 7 // 2  # every block of 6 layers
        for row, expected_row in zip(analysis.metrics[name], expected, strict=True):
            assert [v is None for v in row] == [e is None for e in expected_row]
            # the distances are small (the embeddings dominate the stream): overflow would give 0.5 or NaN
            assert [v for v in row if v is not None] == pytest.approx([e for e in expected_row if e is not None],
                                                                      rel=0.1)


def test_identical_states_give_zero_distance_not_nan(device):
    model = tiny_model("llama", device=device)
    stack = find_layer_stack(model)
    # A layer that returns its input makes cos exactly 1 up to rounding: arccos must be clamped.
    handle = stack.layers[2].register_forward_hook(lambda m, args, kwargs, out: kwargs.get("hidden_states", args[0] if args else None), with_kwargs=True)
    try:
        analysis = depthcut.analyze(model, data=_calibration([9, 9]), progress=False)
    finally:
        handle.remove()
    assert analysis.metrics["angular_last_token"][0][2] == pytest.approx(0.0, abs=1e-3)
    assert analysis.best_block(1) == (2, 3)


def test_batch_size_does_not_change_results(device):
    calibration = _calibration([12, 7, 10, 5, 9, 11])
    model = tiny_model("qwen2", device=device)
    one = depthcut.analyze(model, data=calibration, batch_size=1, progress=False)
    many = depthcut.analyze(model, data=calibration, batch_size=4, progress=False)
    for name in one.metrics:
        _assert_close(many.metrics[name], one.metrics[name], tol=tolerance(device, 1e-5, 1e-4))


def test_block_influence_without_the_all_token_slab_equals_it_with_the_slab(device, monkeypatch):
    """Without an all-token angular distance, Block Influence is taken as each state arrives from the
    one before it: no (B, T, L+1, H) slab is allocated, and the values are the slab's."""
    from depthcut.analysis import capture as capture_module

    calibration = _calibration([12, 7, 10, 5])
    model = tiny_model("llama", device=device)
    with_slab = depthcut.analyze(model, data=calibration, batch_size=2, progress=False)
    slabs = []
    original = capture_module.ResidualCapture.cosines

    def watched(self, *args):
        slabs.append(self.all_tokens)
        return original(self, *args)

    monkeypatch.setattr(capture_module.ResidualCapture, "cosines", watched)
    without = depthcut.analyze(model, data=calibration, batch_size=2, metrics=["angular_last_token", "block_influence"],
                               progress=False)
    assert slabs and all(slab is None for slab in slabs)
    _assert_close(without.metrics["block_influence"], with_slab.metrics["block_influence"],
                  tol=tolerance(device, 1e-6, 1e-4))
    assert without.metrics["angular_last_token"] == with_slab.metrics["angular_last_token"]


def test_metric_subset_and_unknown_metric(device):
    model = tiny_model("llama", device=device)
    analysis = depthcut.analyze(model, data=_calibration([8, 8]), metrics=["angular_last_token"], progress=False)
    assert list(analysis.metrics) == ["angular_last_token"]
    with pytest.raises(depthcut.DepthcutError, match="Did you mean 'angular_last_token'"):
        depthcut.analyze(model, data=_calibration([8]), metrics=["angular_last_tokn"], progress=False)


def test_analysis_json_roundtrip(tmp_path):
    analysis = depthcut.analyze(tiny_model("llama"), data=_calibration([8, 8]), progress=False)
    path = tmp_path / "analysis.json"
    analysis.save(path)
    import json

    data = json.loads(path.read_text())
    assert data["format"] == "depthcut.analysis.passes" and data["num_layers"] == 6
    assert data["best_block"]["2"] == list(analysis.best_block(2))
    assert set(data["metadata"]) >= {"model", "data", "samples", "tokens", "seed", "dtype", "depthcut_version"}
    loaded = depthcut.Analysis.load(path)
    assert loaded.metrics == analysis.metrics and loaded.best_blocks() == analysis.best_blocks()
