"""The shrink's shortcuts are exact: a candidate run from the unpruned stream its cut leaves unchanged
scores as one run from the embeddings; screening scores the finalists on exactly the windows and
fits that scoring every option on every window would, and leaves the others out of the choice."""

from __future__ import annotations

import copy

import pytest
import torch
from test_shrink import SMALL
from transformers import AutoModelForCausalLM, AutoTokenizer

from depthcut.analysis.calibration import build_calibration
from depthcut.io.data import load_texts
from depthcut.pipeline import validation
from depthcut.pipeline.shrink import decision_table, shrink_to
from depthcut.pipeline.validation import references, resume_layer, scores_after_cut

CUTS = [[2, 3], [4, 5], [1, 2, 3], [0, 1], [1, 3, 5]]


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir, corpus_file):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    windows = build_calibration(tokenizer, load_texts(str(corpus_file)), 5, 32, "windows", 1, allow_fewer=True)
    return model, {"text": windows}


def test_a_cut_run_from_the_kept_stream_scores_as_one_run_from_the_embeddings(tiny):
    model, sets = tiny
    kept = references(model, sets, 2, CUTS)
    assert sorted(kept["text"].entering) == sorted({resume_layer(c) for c in CUTS} - {0}) == [1, 3]
    plain = {name: copy.copy(reference) for name, reference in kept.items()}
    for reference in plain.values():
        reference.entering = {}
    for cut in CUTS:
        fast = scores_after_cut(model, cut, kept, 2)["text"]
        slow = scores_after_cut(model, cut, plain, 2)["text"]
        assert fast.kl == pytest.approx(slow.kl, rel=1e-5, abs=1e-7) and fast.loss == pytest.approx(slow.loss, rel=1e-5)
        assert min(fast.kl) > 0  # a real cut, not the unpruned model
    assert len(model.model.layers) == 6  # the model scored is a copy


def test_a_start_that_does_not_reproduce_the_unpruned_model_is_not_used(tiny, monkeypatch):
    model, sets = tiny
    monkeypatch.setattr(validation, "RESUME_TOLERANCE", -1.0)  # no drift passes: as if stripping were not exact
    kept = references(model, sets, 2, CUTS)
    assert kept["text"].entering == {}
    assert scores_after_cut(model, [2, 3], kept, 2)["text"].kl  # scored from the embeddings instead


def test_screening_scores_the_finalists_as_scoring_everything_would(tmp_path, tiny_llama_dir, corpus_file):
    common = {"model": str(tiny_llama_dir), "drop": 2, "data": str(corpus_file), "validate": (str(corpus_file),),
              "candidates": 3, **SMALL}
    everything = shrink_to(**common, screen_windows=0, out=str(tmp_path / "all")).provenance["selection"]
    screened = shrink_to(**common, screen_windows=3, finalists=2, out=str(tmp_path / "screened")).provenance["selection"]
    full = {(tuple(r["layers"]), r["repair"]): r for r in everything["options"]}
    source = str(corpus_file)
    finalists = {tuple(r["layers"]) for r in screened["options"] if not r["screened"] and not r["refused"]}
    # without screening, only a refinement may be left out (`refinements`: not fitted, and said why)
    assert len(finalists) == 2
    assert all(r["repair"] == "cosine" and r["validation"] == {} and r["why"].startswith("not fitted")
               for r in everything["options"] if r["screened"])
    for row in screened["options"]:
        reference = full[(tuple(row["layers"]), row["repair"])]
        contiguous = row["layers"] == list(range(row["layers"][0], row["layers"][-1] + 1))
        if row["repair"] in ("lstsq", "cosine") and (not contiguous or row["layers"][0] == 0):  # refused, screened or not
            assert row["refused"] and not row["screened"], row
        if row["refused"]:
            assert reference["refused"]
            continue
        if tuple(row["layers"]) in finalists:  # every window, the same fit: the same scores
            if not row["validation"] or not reference["validation"]:  # a refinement left out by either run
                left_out = row if not row["validation"] else reference
                assert row["repair"] == "cosine" and left_out["why"].startswith("not fitted")
                continue
            assert row["validation"][source]["windows"] == SMALL["validation_windows"]
            assert row["validation"][source]["kl"] == pytest.approx(reference["validation"][source]["kl"], rel=1e-5)
            continue
        assert row["screened"] and not row["kept"]
        if row["repair"] == "cosine":  # not fitted for a block screened out
            assert row["validation"] == {} and "not fitted" in row["why"]
        else:  # its first windows only, as the full run scored them
            assert row["validation"][source]["windows"] == 3 and "screened out" in row["why"]
    # the finalists are the blocks whose best option did best on the first windows
    best = {}
    for row in screened["options"]:
        if row.get("screening"):
            block = tuple(row["layers"])
            best[block] = min(best.get(block, float("inf")), row["screening"][source]["kl"])
            assert row["screening"][source]["windows"] == 3
    assert finalists == set(sorted(best, key=best.get)[:2]) and len(best) > 2
    assert screened["winner"]["layers"] in [list(b) for b in finalists]
    table = "\n".join(decision_table(screened))
    assert " out " in table and "not fitted: its block was screened out" in table
