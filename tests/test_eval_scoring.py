"""The scorer (token pairs in, (log-likelihood, is_greedy) out) and DepthcutLM's requests against
lm-eval's HFLM and against naive one-sequence-per-pair references."""

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from tiny import tiny_model, tolerance

from depthcut.evaluation.lm import DepthcutLM
from depthcut.evaluation.scoring import Scorer

REQUESTS = [
    ("the quick brown fox", " jumps"),
    ("the quick brown fox", " jumps over the lazy dog"),
    ("the quick brown fox", " depth pruning"),
    ("depth pruning removes layers", " from models"),
    ("depth pruning removes layers ", "from"),  # trailing space moves to the continuation
    ("the", " quick brown"),
    ("", "the lazy dog"),  # empty context: scored after the BOS token
    ("over the lazy dog the quick brown fox jumps over the lazy dog depth", " layers"),
]


def instances(pairs, kind="loglikelihood"):
    return [Instance(kind, {}, pair, i) for i, pair in enumerate(pairs)]


def encoded(lm, context, continuation):
    """The token pair lm-eval's TemplateLM makes of a request."""
    if not context:
        return [lm.prefix_token_id], lm.tok_encode(continuation, add_special_tokens=False)
    return lm._encode_pair(context, continuation)


def naive(model, context_ids, continuation_ids) -> tuple[float, bool]:
    """One unpadded sequence, full logits, float64 sum, and whether every token is the argmax."""
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logprobs = model(input_ids=ids).logits[0].double().log_softmax(-1)
    positions = list(range(len(context_ids) - 1, len(context_ids) + len(continuation_ids) - 1))
    value = float(sum(logprobs[p, t] for p, t in zip(positions, continuation_ids)))
    return value, all(int(logprobs[p].argmax()) == t for p, t in zip(positions, continuation_ids))


def check(got, expected, device):
    assert [g for _, g in got] == [g for _, g in expected]
    assert [v for v, _ in got] == pytest.approx([v for v, _ in expected], abs=tolerance(device, 1e-4, 1e-3))


@pytest.mark.parametrize("mode", ["packed", "shared", "full"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "gemma2", "falcon", "gpt_neox", "qwen3"])
def test_batched_scores_equal_naive_unpadded_scores(arch, mode, tokenizer, device):
    model = tiny_model(arch)
    lm = DepthcutLM(model, tokenizer, scoring=mode, batch_size=3, progress=False)
    expected = [naive(model, *encoded(lm, c, x)) for c, x in REQUESTS]  # on the CPU
    lm = DepthcutLM(model.to(device), tokenizer, scoring=mode, batch_size=3, progress=False)
    check(lm.loglikelihood(instances(REQUESTS)), expected, device)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "phi3"])
def test_requests_score_as_lm_evals_hf_model_scores_them(arch, tokenizer, device):
    """The same tokens (trailing space, empty context, the tokenizer's own special tokens) and the
    same (logprob, is_greedy) as HFLM, in request order."""
    model = tiny_model(arch, device=device)
    reference = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
    ours = DepthcutLM(model, tokenizer, batch_size=4, progress=False)
    for context, continuation in REQUESTS:
        assert encoded(ours, context, continuation) == encoded(reference, context, continuation)
    check(ours.loglikelihood(instances(REQUESTS)), reference.loglikelihood(instances(REQUESTS), disable_tqdm=True),
          device)


@pytest.mark.parametrize("arch,overrides", [("llama", {}), ("gemma2", {"sliding_window": 64}),
                                            ("qwen3", {"sliding_window": 64})])
def test_packed_rows_score_every_batch_without_the_cache_path(arch, overrides, tokenizer, monkeypatch, device):
    """Contexts with several continuations, one row each: the additive 4D mask (sdpa and eager)
    must keep siblings apart, matching one unpadded sequence per pair."""
    model = tiny_model(arch, **overrides)
    lm = DepthcutLM(model, tokenizer, batch_size=4, progress=False)
    expected = [naive(model, *encoded(lm, c, x)) for c, x in REQUESTS]
    monkeypatch.setattr(Scorer, "_score_shared", lambda self, batch: pytest.fail("fell back to the cache path"))
    check(DepthcutLM(model.to(device), tokenizer, batch_size=4).loglikelihood(instances(REQUESTS)), expected, device)


def test_rows_longer_than_the_sliding_window_fall_back_to_the_cache_path(tokenizer, monkeypatch, device):
    model = tiny_model("mistral")  # window 4: one batch of all requests is wider
    lm = DepthcutLM(model, tokenizer, batch_size=len(REQUESTS), progress=False)
    expected = [naive(model, *encoded(lm, c, x)) for c, x in REQUESTS]
    monkeypatch.setattr(Scorer, "_score_packed", lambda self, batch: pytest.fail("packed a row past the window"))
    lm = DepthcutLM(model.to(device), tokenizer, batch_size=len(REQUESTS), progress=False)
    check(lm.loglikelihood(instances(REQUESTS)), expected, device)


def test_unknown_scoring_mode_is_refused(tokenizer):
    with pytest.raises(ValueError, match="packed, shared, full"):
        DepthcutLM(tiny_model("llama"), tokenizer, scoring="cached")


def test_a_model_in_memory_needs_its_tokenizer():
    with pytest.raises(ValueError, match="needs its tokenizer"):
        DepthcutLM(tiny_model("llama"))


def test_long_contexts_are_truncated_from_the_left(tokenizer, device):
    model = tiny_model("llama")
    lm = DepthcutLM(model, tokenizer, max_length=16, progress=False)
    context = "the quick brown fox jumps over the lazy dog " * 20
    context_ids, continuation_ids = encoded(lm, context, " depth")
    kept = context_ids[-(17 - len(continuation_ids)):]
    assert len(kept) + len(continuation_ids) == 17 and len(context_ids) > len(kept)
    expected = [naive(model, kept, continuation_ids)]
    lm = DepthcutLM(model.to(device), tokenizer, max_length=16, progress=False)
    check(lm.loglikelihood(instances([(context, " depth")])), expected, device)


@pytest.mark.parametrize("mode", ["packed", "shared", "full"])
def test_a_continuation_longer_than_the_context_window_is_scored_on_its_tail(tokenizer, mode, device):
    model = tiny_model("llama")
    continuation = list(range(3, 40))
    window = ([5, 6] + continuation)[-17:]  # 16 predictions, all of continuation tokens
    # the reference first, on the CPU: Module.cpu() would move the scorer's model back in place
    expected = [naive(model, window[:1], window[1:])]
    scorer = Scorer(model.to(device), max_length=16, mode=mode)
    check(scorer.score([([5, 6], continuation)]), expected, device)


def test_greedy_flags_follow_the_argmax(tokenizer):
    """A continuation made of the model's own greedy tokens is greedy; change one token and it is not."""
    model = tiny_model("llama")
    context = [5, 9, 14]
    greedy = model.generate(torch.tensor([context]), max_new_tokens=4, do_sample=False)[0, 3:].tolist()
    other = greedy[:2] + [(greedy[2] + 1) % 96 or 3] + greedy[3:]
    for mode in Scorer.MODES:
        scores = Scorer(model, batch_size=2, mode=mode).score([(context, greedy), (context, other)])
        assert [flag for _, flag in scores] == [True, False]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rolling_loglikelihood_equals_hflm(arch, tokenizer, device):
    model = tiny_model(arch, device=device)
    texts = [("the quick brown fox jumps over the lazy dog " * 12,), ("depth pruning removes layers",)]
    reference = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2, max_length=32)
    ours = DepthcutLM(model, tokenizer, batch_size=2, max_length=32, progress=False)
    got = ours.loglikelihood_rolling(instances(texts, "loglikelihood_rolling"))
    expected = reference.loglikelihood_rolling(instances(texts, "loglikelihood_rolling"), disable_tqdm=True)
    assert got == pytest.approx(expected, abs=tolerance(device, 1e-3, 1e-2))


def test_generation_equals_hflm_greedy_with_stop_sequences(tokenizer, device):
    model = tiny_model("llama", device=device)
    requests = [("the quick brown", {"until": ["dog"], "max_gen_toks": 12, "do_sample": False}),
                ("depth pruning", {"until": ["\n\n"], "max_gen_toks": 5, "do_sample": False}),
                ("the lazy", {"until": ["dog"], "max_gen_toks": 12, "do_sample": False})]
    reference = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2)
    expected = reference.generate_until(instances(requests, "generate_until"), disable_tqdm=True)
    got = DepthcutLM(model, tokenizer, batch_size=2, progress=False).generate_until(
        instances(requests, "generate_until"))
    assert got == expected and all("dog" not in text for text in got)


def test_disable_tqdm_and_progress_silence_the_bars(tokenizer, capsys):
    model = tiny_model("llama")
    DepthcutLM(model, tokenizer).loglikelihood(instances(REQUESTS), disable_tqdm=True)
    DepthcutLM(model, tokenizer, progress=False).loglikelihood(instances(REQUESTS))
    assert capsys.readouterr().err == ""
    DepthcutLM(model, tokenizer).loglikelihood(instances(REQUESTS))
    assert "loglikelihood" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["packed", "shared", "full"])
def test_a_batch_whose_logits_would_pass_the_budget_is_split_and_scores_the_same(mode, tokenizer, monkeypatch):
    """WikiText-2's rolling windows on SmolLM2 (16 rows of 8192 positions x 49,152 tokens) would need 26 GB
    of logits in one pass: batches are cut to the budget, one row at the least, with the same scores."""
    model = tiny_model("llama")
    vocab = model.get_output_embeddings().weight.shape[0]
    lm = DepthcutLM(model, tokenizer, scoring=mode, batch_size=8, progress=False)
    requests = REQUESTS + [("the quick", " brown fox jumps over the lazy dog"), ("the quick", " fox naps"),
                           ("the quick", " dog and the quick fox")]  # one context, long continuations
    expected = [naive(model, *encoded(lm, c, x)) for c, x in requests]
    batches = []
    real = Scorer._batches
    monkeypatch.setattr(Scorer, "_batches", lambda self, ordered, positions: (batches.append(b) or b
                                                                              for b in real(self, ordered, positions)))
    monkeypatch.setattr(Scorer, "LOGITS_BYTES", 12 * vocab * 4)  # 12 positions' logits
    check(lm.loglikelihood(instances(requests)), expected, "cpu")
    assert len(batches) > 1 and sum(sum(len(g.members) for g in b) for b in batches) == len(requests)
    for batch in batches:  # within the budget, or a single request that cannot be cut
        rows = max(len(g.context) + sum(len(c) for _, c in g.members) for g in batch)
        assert len(batch) * rows <= 12 or (len(batch) == 1 and len(batch[0].members) == 1)
