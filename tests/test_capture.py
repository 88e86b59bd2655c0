"""The capture keeps states in the model's dtype and takes cosines in float32 chunks."""

import torch
from tiny import random_ids, tiny_model

from depthcut.analysis import capture as capture_module
from depthcut.analysis.calibration import CalibrationSet
from depthcut.analysis.capture import ResidualCapture, StopForward, unit_cosines
from depthcut.analysis.passes import analyze
from depthcut.model.layers import find_layer_stack


def _calibration(batch=3, length=10):
    ids = random_ids(batch, length, seed=4)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # a padded row: its last token is position 6
    return CalibrationSet(input_ids=ids, attention_mask=mask, description="random", seed=0, mode="windows")


def _naive_cosines(model, ids, mask):
    """Hidden states from output_hidden_states (entering each layer), last from a hook, in float64."""
    states = []
    stack = find_layer_stack(model)
    handles = [layer.register_forward_pre_hook(lambda m, a, k: states.append(a[0] if a else k["hidden_states"]),
                                               with_kwargs=True) for layer in stack.layers]
    handles.append(stack.layers[-1].register_forward_hook(
        lambda m, a, k, out: states.append(out[0] if isinstance(out, tuple) else out), with_kwargs=True))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    for handle in handles:
        handle.remove()
    stacked = torch.stack([s.double() for s in states], dim=2)  # (B, T, P, H)
    units = stacked / stacked.norm(dim=-1, keepdim=True)
    return units @ units.transpose(-1, -2)  # (B, T, P, P)


def test_states_are_kept_in_the_model_dtype_and_cosines_match_float64():
    model = tiny_model("llama").to(torch.bfloat16)
    calibration = _calibration()
    ids, mask = calibration.input_ids, calibration.attention_mask
    recorder = ResidualCapture(find_layer_stack(model), keep_all_tokens=True)
    recorder.start_batch(mask)
    with recorder.hooks(), torch.no_grad():
        try:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        except StopForward:
            pass
    assert recorder.all_tokens.dtype == torch.bfloat16 and recorder.last_token.dtype == torch.bfloat16
    cosines = recorder.cosines()
    reference = _naive_cosines(model, ids, mask)
    last = torch.tensor([9, 6, 9])
    torch.testing.assert_close(cosines["last_token"].double(), reference[torch.arange(3), last], atol=1e-5, rtol=0)
    torch.testing.assert_close(cosines["all_tokens"].double(), reference[mask.bool()], atol=1e-5, rtol=0)


def test_chunked_cosines_equal_one_chunk(monkeypatch):
    model = tiny_model("qwen3")
    calibration = _calibration(batch=4, length=12)
    whole = analyze(model, data=calibration, batch_size=4, progress=False)
    # 5 tokens a chunk: the 46 valid tokens of the batch are taken in 10 chunks
    monkeypatch.setattr(capture_module, "CHUNK_BYTES", 5 * 7 * 32 * 4)
    chunked = analyze(model, data=calibration, batch_size=4, progress=False)
    def numbers(values):  # None marks blocks past the last layer
        return torch.tensor(values if not isinstance(values[0], list) else
                            [[float("nan") if v is None else v for v in row] for row in values], dtype=torch.float64)

    for name, values in whole.metrics.items():
        torch.testing.assert_close(numbers(chunked.metrics[name]), numbers(values), atol=1e-7, rtol=0, equal_nan=True)


def test_unit_cosines_of_parallel_and_opposite_states():
    states = torch.tensor([[[3.0, 0.0], [6.0, 0.0], [-1.0, 0.0], [0.0, 2.0]]], dtype=torch.bfloat16)
    expected = torch.tensor([[1, 1, -1, 0], [1, 1, -1, 0], [-1, -1, 1, 0], [0, 0, 0, 1]], dtype=torch.float32)
    torch.testing.assert_close(unit_cosines(states)[0], expected)
