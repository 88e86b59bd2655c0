import pytest
import torch

from depthcut.evaluation.scoring import Scorer, encode_pair
from tiny import tiny_model, tolerance

REQUESTS = [
    ("the quick brown fox", " jumps"),
    ("the quick brown fox", " jumps over the lazy dog"),
    ("the quick brown fox", " depth pruning"),
    ("depth pruning removes layers", " from models"),
    ("depth pruning removes layers ", "from"),  # trailing space moves to the continuation
    ("the", " quick brown"),
    ("", "the lazy dog"),  # empty context: scored after a BOS token
    ("over the lazy dog the quick brown fox jumps over the lazy dog depth", " layers"),
]


def naive_loglikelihood(model, tokenizer, context, continuation) -> float:
    """One unpadded sequence per pair, full logits, float64 sum."""
    context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logprobs = model(input_ids=ids).logits[0].double().log_softmax(-1)
    positions = range(len(context_ids) - 1, len(context_ids) + len(continuation_ids) - 1)
    return float(sum(logprobs[p, t] for p, t in zip(positions, continuation_ids)))


def test_encode_pair_moves_trailing_space_and_splits_on_the_joint_encoding(tokenizer):
    context_ids, continuation_ids = encode_pair(tokenizer, "the quick ", "brown")
    assert context_ids == tokenizer("the quick", add_special_tokens=False)["input_ids"]
    assert context_ids + continuation_ids == tokenizer("the quick brown", add_special_tokens=False)["input_ids"]
    assert encode_pair(tokenizer, "", "fox")[0] == [tokenizer.bos_token_id]


@pytest.mark.parametrize("mode", ["packed", "shared", "full"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "gemma2", "falcon", "gpt_neox", "qwen3"])
def test_batched_scores_equal_naive_unpadded_scores(arch, mode, tokenizer, device):
    model = tiny_model(arch)
    expected = [naive_loglikelihood(model, tokenizer, c, x) for c, x in REQUESTS]  # on the CPU
    scorer = Scorer(model.to(device), tokenizer, batch_size=3, mode=mode)
    assert scorer.loglikelihoods(REQUESTS) == pytest.approx(expected, abs=tolerance(device, 1e-4, 1e-3))


@pytest.mark.parametrize("arch,overrides", [("llama", {}), ("gemma2", {"sliding_window": 64}),
                                            ("qwen3", {"sliding_window": 64})])
def test_packed_rows_score_every_batch_without_the_cache_path(arch, overrides, tokenizer, monkeypatch, device):
    """Contexts with several continuations, one row each: the additive 4D mask (sdpa and eager)
    must keep siblings apart, matching one unpadded sequence per pair."""
    model = tiny_model(arch, **overrides)
    expected = [naive_loglikelihood(model, tokenizer, c, x) for c, x in REQUESTS]
    monkeypatch.setattr(Scorer, "_score_shared", lambda self, batch: pytest.fail("fell back to the cache path"))
    scorer = Scorer(model.to(device), tokenizer, batch_size=4)
    assert scorer.loglikelihoods(REQUESTS) == pytest.approx(expected, abs=tolerance(device, 1e-4, 1e-3))


def test_rows_longer_than_the_sliding_window_fall_back_to_the_cache_path(tokenizer, monkeypatch, device):
    model = tiny_model("mistral")  # window 4: one batch of all requests is wider
    expected = [naive_loglikelihood(model, tokenizer, c, x) for c, x in REQUESTS]
    monkeypatch.setattr(Scorer, "_score_packed", lambda self, batch: pytest.fail("packed a row past the window"))
    scores = Scorer(model.to(device), tokenizer, batch_size=len(REQUESTS)).loglikelihoods(REQUESTS)
    assert scores == pytest.approx(expected, abs=tolerance(device, 1e-4, 1e-3))


def test_unknown_scoring_mode_is_refused(tokenizer):
    with pytest.raises(ValueError, match="packed, shared, full"):
        Scorer(tiny_model("llama"), tokenizer, mode="cached")


def test_long_contexts_are_truncated_from_the_left(tokenizer, device):
    model = tiny_model("llama")
    context = "the quick brown fox jumps over the lazy dog " * 20
    context_ids, continuation_ids = encode_pair(tokenizer, context, " depth")
    kept = context_ids[-(17 - len(continuation_ids)):]
    ids = torch.tensor([kept + continuation_ids])
    with torch.no_grad():
        logprobs = model(input_ids=ids).logits[0].double().log_softmax(-1)
    positions = range(len(kept) - 1, len(kept) + len(continuation_ids) - 1)
    expected = float(sum(logprobs[p, t] for p, t in zip(positions, continuation_ids)))
    assert len(kept) + len(continuation_ids) == 17 and len(context_ids) > len(kept)
    scorer = Scorer(model.to(device), tokenizer, max_length=16)
    assert scorer.loglikelihoods([(context, " depth")])[0] == pytest.approx(expected, abs=tolerance(device, 1e-4, 1e-3))


@pytest.mark.parametrize("mode", ["packed", "shared", "full"])
def test_a_continuation_longer_than_the_context_window_is_scored_on_its_tail(tokenizer, mode, device):
    model = tiny_model("llama")
    continuation = " the quick brown fox jumps over the lazy dog" * 6
    context_ids, continuation_ids = encode_pair(tokenizer, "depth", continuation)
    assert len(continuation_ids) > 16
    window = (context_ids + continuation_ids)[-17:]  # 16 predictions, all of continuation tokens
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([window[:-1]])).logits[0].double().log_softmax(-1)
    expected = float(sum(logprobs[i, t] for i, t in enumerate(window[1:])))
    got = Scorer(model.to(device), tokenizer, max_length=16, mode=mode).loglikelihoods([("depth", continuation)])[0]
    assert got == pytest.approx(expected, abs=tolerance(device, 1e-4, 1e-3))
