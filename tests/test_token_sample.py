"""The all-token angular distance on a sample of positions (issue 25): which tokens, the estimate
against a naive computation over them, its standard error over sequences, and the streamed path
reading the same tokens."""

import math

import pytest
import torch
from test_analysis import _assert_close, _calibration
from test_capture import _naive_cosines
from tiny import tiny_model

import depthcut
from depthcut.analysis.capture import TOKEN_POSITIONS, sampled_tokens
from depthcut.errors import DepthcutError
from depthcut.metrics.base import angular


def test_sampled_tokens_are_evenly_spaced_over_the_valid_ones_with_the_first_and_last():
    mask = torch.zeros(3, 20, dtype=torch.long)
    mask[0, :] = 1  # 20 valid tokens, 5 kept
    mask[1, :9] = 1  # 9 valid tokens, 5 kept
    mask[2, :4] = 1  # 4 valid tokens: every one
    flat, rows = sampled_tokens(mask, 5)
    assert flat.tolist() == [0, 5, 10, 14, 19] + [20 + p for p in (0, 2, 4, 6, 8)] + [40, 41, 42, 43]
    assert rows.tolist() == [0] * 5 + [1] * 5 + [2] * 4
    every, _ = sampled_tokens(mask, 0)
    assert every.tolist() == mask.reshape(-1).nonzero()[:, 0].tolist()
    assert TOKEN_POSITIONS == 128


def _reference(model, calibration, per_sequence):
    """Naive: float64 cosines of every token, the sampled positions picked by hand, plain means."""
    ids, mask = calibration.input_ids, calibration.attention_mask
    cosines = _naive_cosines(model, ids, mask)  # (B, T, P, P)
    per_row = []
    for row in range(len(ids)):
        valid = mask[row].nonzero()[:, 0].tolist()
        if per_sequence and len(valid) > per_sequence:
            step = (len(valid) - 1) / (per_sequence - 1)
            valid = [valid[math.floor(i * step + 0.5)] for i in range(per_sequence)]
        per_row.append(angular(cosines[row, valid]))  # (n, P, P)
    tokens = torch.cat(per_row)
    means = torch.stack([d.mean(dim=0) for d in per_row])
    return tokens.mean(dim=0), means.std(dim=0) / math.sqrt(len(per_row))


def _matrix(square, num_layers):
    return [[square[first][first + n].item() if first + n <= num_layers else None for first in range(num_layers)]
            for n in range(1, num_layers + 1)]


@pytest.mark.parametrize("per_sequence", [4, 0])
def test_sampled_all_token_distance_and_its_standard_error_match_a_naive_computation(per_sequence):
    model = tiny_model("llama")
    calibration = _calibration([12, 7, 10, 3, 9])
    result = depthcut.analyze(model, data=calibration, batch_size=2, progress=False, token_positions=per_sequence)
    mean, stderr = _reference(model, calibration, per_sequence)
    layers = result.num_layers
    _assert_close(result.metrics["angular_all_tokens"], _matrix(mean, layers), tol=1e-6)
    _assert_close(result.metadata["metric_stderr"]["angular_all_tokens"], _matrix(stderr, layers), tol=1e-6)
    estimator = result.metadata["metric_estimators"]["angular_all_tokens"]
    assert ("evenly spaced" in estimator) == bool(per_sequence)
    assert result.metadata["token_positions"] == (per_sequence or None)


def test_block_influence_reads_every_token_whatever_the_sample():
    model = tiny_model("qwen3")
    calibration = _calibration([12, 7, 10, 3, 9])
    sampled = depthcut.analyze(model, data=calibration, batch_size=2, progress=False, token_positions=3)
    every = depthcut.analyze(model, data=calibration, batch_size=2, progress=False, token_positions=0)
    _assert_close(sampled.metrics["block_influence"], every.metrics["block_influence"], tol=1e-7)
    _assert_close(sampled.metrics["angular_last_token"], every.metrics["angular_last_token"], tol=1e-7)
    assert sampled.metrics["angular_all_tokens"] != every.metrics["angular_all_tokens"]  # 3 of up to 12 tokens


def test_the_streamed_path_reads_the_same_sampled_tokens(tmp_path, tokenizer):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    calibration = _calibration([12, 7, 10, 3, 9])
    expected = depthcut.analyze(model, data=calibration, batch_size=2, progress=False, token_positions=4)
    streamed = depthcut.analyze_streamed(tmp_path / "model", data=calibration, batch_size=2, dtype=torch.float32,
                                         spill_dir=tmp_path, progress=False, token_positions=4)
    for name in expected.metrics:
        _assert_close(streamed.metrics[name], expected.metrics[name], tol=1e-6)
    _assert_close(streamed.metadata["metric_stderr"]["angular_all_tokens"],
                  expected.metadata["metric_stderr"]["angular_all_tokens"], tol=1e-6)
    hidden, positions = model.config.hidden_size, model.config.num_hidden_layers + 1
    assert streamed.metadata["streamed"]["spilled_bytes"] == positions * (4 + 4 + 4 + 3 + 4) * hidden * 4


@pytest.mark.parametrize("bad", [-1, 2.5, True])
def test_a_bad_token_positions_is_one_clear_error(bad):
    with pytest.raises(DepthcutError, match="token positions"):
        depthcut.analyze(tiny_model("llama"), data=_calibration([5, 4]), progress=False, token_positions=bad)


def test_read_back_chunks_end_where_a_sequence_ends():
    from depthcut.analysis.spill import sequence_chunks

    assert sequence_chunks([3, 2, 5, 1], 5) == [(0, 5), (5, 10), (10, 11)]
    assert sequence_chunks([7, 1], 5) == [(0, 7), (7, 8)]  # a sequence longer than a chunk is one
    assert sequence_chunks([], 5) == []


def test_the_command_line_takes_token_positions_and_refuses_a_negative_one(capsys, tmp_path, tiny_llama_dir,
                                                                          corpus_file):
    import json

    from depthcut.cli import main

    tiny_llama_dir = str(tiny_llama_dir)
    small = ["--data", str(corpus_file), "--samples", "3", "--seq-len", "12", "--batch-size", "2", "--quiet"]
    assert main(["analyze", tiny_llama_dir, *small, "--token-positions", "5", "--out", str(tmp_path / "a")]) == 0
    metadata = json.loads((tmp_path / "a" / "analysis.json").read_text())["metadata"]
    assert metadata["token_positions"] == 5 and "5 evenly spaced" in metadata["metric_estimators"]["angular_all_tokens"]
    assert len(metadata["metric_stderr"]["angular_last_token"]) == len(metadata["metric_stderr"]["angular_all_tokens"])
    capsys.readouterr()
    assert main(["analyze", tiny_llama_dir, *small, "--token-positions", "-1", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "depthcut: error: --token-positions must be 0 or more (0: every token), got -1"  # before loading
    assert not (tmp_path / "b").exists()
