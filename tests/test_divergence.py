"""The validation scores of `depthcut shrink` (`window_scores`) against a naive float64 computation of
KL(unpruned || candidate) and the candidate's loss, window by window, padding left out."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tiny import padded_calibration, tiny_model

from depthcut.evaluation import divergence
from depthcut.evaluation.divergence import reference_predictions, window_scores
from depthcut.model.surgery import remove_layers


class TableModel(torch.nn.Module):
    """A 'model' whose logits are a fixed function of each token and its position: heavy-tailed
    distributions over a vocabulary as wide as a real model's (49,152, SmolLM2's)."""

    def __init__(self, vocab: int, width: int, spread: float, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Parameter(torch.randn(vocab, width, generator=generator))
        self.head = torch.nn.Parameter(torch.randn(width, vocab, generator=generator) * spread / width**0.5)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        position = torch.arange(input_ids.shape[1]).float()[None, :, None]
        return SimpleNamespace(logits=(self.embed[input_ids] + torch.sin(position)) @ self.head)


def _pair(vocab: int, width: int) -> tuple[TableModel, TableModel]:
    """(the reference, a candidate whose head is perturbed): distributions that differ measurably."""
    reference = TableModel(vocab, width, spread=4.0, seed=0)
    candidate = TableModel(vocab, width, spread=4.0, seed=0)
    with torch.no_grad():
        candidate.head.add_(0.3 * torch.randn(candidate.head.shape, generator=torch.Generator().manual_seed(9)))
    return reference, candidate


def naive(candidate, reference, windows) -> tuple[list[float], list[float]]:
    """Per window: mean KL and mean loss over the predicted, non-padding tokens, in float64."""
    kl, loss = [], []
    with torch.no_grad():
        for ids, mask in zip(windows.input_ids, windows.attention_mask, strict=True):
            length = int(mask.sum())
            p = reference(input_ids=ids[None, :length]).logits[0, :-1].double().log_softmax(-1)
            q = candidate(input_ids=ids[None, :length]).logits[0, :-1].double().log_softmax(-1)
            kl.append(float((p.exp() * (p - q)).sum(-1).mean()))
            loss.append(float(-q.gather(-1, ids[1:length, None])[:, 0].mean()))
    return kl, loss


def test_scores_on_a_wide_vocabulary_match_float64():
    windows = padded_calibration([24, 17, 24, 9], seed=5)
    reference, candidate = _pair(49_152, 32)
    stored = reference_predictions(reference, windows, batch_size=3)
    scores = window_scores(candidate, stored, batch_size=3)
    expected_kl, expected_loss = naive(candidate, reference, windows)
    assert scores.kl == pytest.approx(expected_kl, rel=1e-4, abs=2e-6)
    assert scores.loss == pytest.approx(expected_loss, rel=1e-6, abs=1e-6)
    assert min(expected_kl) > 1e-3  # the candidate does differ
    # the unpruned model against itself: no divergence beyond the storage's rounding, and its own loss kept
    itself = window_scores(reference, stored, batch_size=3)
    assert max(abs(value) for value in itself.kl) < 2e-6
    assert stored.loss == pytest.approx(naive(reference, reference, windows)[1], rel=1e-6, abs=1e-6)
    assert stored.subset(1, 3).loss == stored.loss[1:3]


@pytest.mark.parametrize("chunk_bytes", [divergence.CHUNK_BYTES, 1], ids=["whole windows", "a token a slice"])
def test_scores_of_a_cut_model_match_float64(chunk_bytes, monkeypatch):
    monkeypatch.setattr(divergence, "CHUNK_BYTES", chunk_bytes)  # the slicing changes no figure
    windows = padded_calibration([12, 7, 12], seed=2)
    original = tiny_model("llama")
    cut = tiny_model("llama")
    remove_layers(cut, [1])
    stored = reference_predictions(original, windows, batch_size=2)
    scores = window_scores(cut, stored, batch_size=2)
    expected_kl, expected_loss = naive(cut, original, windows)
    assert scores.kl == pytest.approx(expected_kl, rel=1e-4, abs=2e-6)
    assert scores.loss == pytest.approx(expected_loss, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("chunk_bytes", [divergence.CHUNK_BYTES, 1], ids=["whole windows", "a token a slice"])
def test_references_on_disk_score_exactly_as_in_memory(chunk_bytes, monkeypatch, tmp_path):
    """The same bytes read back a slice at a time: every window's KL and loss to the bit, subsets too;
    the file has no name in its folder (nothing left behind) and holds nothing in memory."""
    from depthcut.evaluation.reference_store import DiskProbabilities

    monkeypatch.setattr(divergence, "CHUNK_BYTES", chunk_bytes)
    windows = padded_calibration([24, 17, 24, 9], seed=5)
    reference, candidate = _pair(4_099, 16)
    in_memory = reference_predictions(reference, windows, batch_size=3)
    on_disk = reference_predictions(reference, windows, batch_size=3, store=DiskProbabilities(tmp_path))
    assert list(tmp_path.iterdir()) == [] and on_disk.probabilities.resident_bytes == 0
    assert on_disk.probabilities.file.size == in_memory.probabilities.resident_bytes
    expected = window_scores(candidate, in_memory, batch_size=3)
    assert window_scores(candidate, on_disk, batch_size=3) == expected
    assert window_scores(candidate, on_disk.subset(1, 3), batch_size=2) == window_scores(
        candidate, in_memory.subset(1, 3), batch_size=2)
    expected_kl, _ = naive(candidate, reference, windows)
    assert expected.kl == pytest.approx(expected_kl, rel=1e-4, abs=2e-6)


REFERENCE_MEMORY_SCRIPT = """
import resource, sys, torch
sys.path.insert(0, {tests!r})
from test_divergence import TableModel
from depthcut.analysis.calibration import CalibrationSet
from depthcut.pipeline.validation import references
torch.manual_seed(0)
windows = int(sys.argv[1])
ids = torch.randint(0, 151_936, (windows, 256))
model = TableModel(151_936, 8, spread=4.0, seed=0)
model.get_output_embeddings = lambda: None
model.config = type("C", (), {{"vocab_size": 151_936}})()
sets = {{"text": CalibrationSet(ids, torch.ones_like(ids), "random", "windows", 0)}}
predictions = references(model, sets, batch_size=1)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, type(predictions["text"].probabilities).__name__)
"""


@pytest.mark.slow
def test_references_at_a_150k_vocabulary_grow_the_peak_memory_by_at_most_64_mb_per_10k_tokens(tmp_path):
    """The issue's target, measured: the peak resident memory of computing the references for 6 and for
    12 windows of 256 tokens over a 151,936-token vocabulary (both past the in-memory limit); in memory
    they would add 2·V bytes a token (3 GB per 10,000 tokens, 0.9 GB for the 12 windows)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "references.py"
    script.write_text(REFERENCE_MEMORY_SCRIPT.format(tests=str(Path(__file__).parent)))
    peaks = {}
    # large blocks from mmap, returned when freed: the peak then counts what is kept, not what glibc's heap
    # happened to retain (without it the same run's peak moved by +-30 MB)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for windows in (6, 12):
        done = subprocess.run([sys.executable, str(script), str(windows)], capture_output=True, text=True, check=True,
                              env=env)
        peak, store = done.stdout.split()
        peaks[windows] = int(peak)
        assert store == "DiskProbabilities"
    # in memory, the 6 more windows would add 6 x 255 x 151,936 x 2 bytes (465 MB): 3 GB per 10k tokens
    per_10k_tokens = (peaks[12] - peaks[6]) / (6 * 255) * 10_000
    assert per_10k_tokens <= 64 * 2**20, (f"{per_10k_tokens / 2**20:.0f} MB per 10k tokens (peaks "
                                          f"{peaks[6] / 2**20:.0f} and {peaks[12] / 2**20:.0f} MB)")
