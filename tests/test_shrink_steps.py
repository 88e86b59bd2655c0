"""`depthcut shrink` around its choice: the heal of the winner (kept only where it beats the unhealed
winner on validation), the time budget, and the evaluation of what was written (issue 22)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from test_shrink import SMALL
from transformers import AutoModelForCausalLM, AutoTokenizer

from depthcut.cli import main
from depthcut.errors import DepthcutError
from depthcut.evaluation.divergence import reference_predictions, window_scores
from depthcut.io.data import load_texts, split_documents
from depthcut.pipeline.configs import ShrinkConfig
from depthcut.pipeline.prune_repair import HELDOUT_FRACTION
from depthcut.pipeline.shrink import shrink_to
from depthcut.pipeline.shrink_steps import FEWEST_WINDOWS, plan_for_budget
from depthcut.pipeline.validation import validation_sets

# One candidate, plain or lstsq: the heal is what these tests look at.
ONE = {**SMALL, "candidates": 1, "repairs": ("none", "lstsq"), "heal_steps": 20, "heal_seq_len": 32,
       "heal_batch_size": 4, "objective": "kd"}


def _kl_of_written(out, tiny_llama_dir, corpus_file) -> float:
    """The written model's KL from the original on the shrink's own validation windows, recomputed."""
    source = str(corpus_file)
    original = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    written = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    config = ShrinkConfig(model=str(tiny_llama_dir), out=str(out), drop=2, data=source, **SMALL)
    _, held_out = split_documents(load_texts(source), HELDOUT_FRACTION, config.seed)
    windows = validation_sets(config, AutoTokenizer.from_pretrained(tiny_llama_dir), held_out)[source]
    return window_scores(written, reference_predictions(original, windows)).summary()["kl"]


def _rows(result):
    selection = result.provenance["selection"]
    return selection, {row["repair"]: row for row in selection["options"]}


@pytest.mark.slow
def test_a_heal_that_helps_is_kept_and_is_what_is_written(tmp_path, tiny_llama_dir, corpus_file):
    out = tmp_path / "healed"
    # distillation from the unpruned model lowers the KL; margin 0: any gain counts
    result = shrink_to(model=str(tiny_llama_dir), drop=2, data=str(corpus_file), out=str(out), margin=0.0,
                       heal_lr=3e-3, **ONE)
    selection, rows = _rows(result)
    source = str(corpus_file)
    healed = next(row for name, row in rows.items() if name.endswith("+heal"))
    unhealed = rows[healed["repair"].removesuffix("+heal")]
    assert healed["validation"][source]["kl"] < unhealed["validation"][source]["kl"]
    assert healed["kept"] and selection["winner"]["repair"] == healed["repair"]
    assert selection["heal"]["steps"] == 20 and selection["heal"]["objective"] == "kd"
    assert _kl_of_written(out, tiny_llama_dir, corpus_file) == pytest.approx(healed["validation"][source]["kl"],
                                                                             rel=1e-4, abs=1e-6)
    written = json.loads((out / "depthcut.json").read_text())
    assert written["removed_layers"] == result.removed and written["selection"]["winner"]["repair"].endswith("+heal")


@pytest.mark.slow
def test_a_heal_that_hurts_is_not_kept(tmp_path, tiny_llama_dir, corpus_file):
    out = tmp_path / "unhealed"
    result = shrink_to(model=str(tiny_llama_dir), drop=2, data=str(corpus_file), out=str(out), heal_lr=10.0, **ONE)
    selection, rows = _rows(result)
    source = str(corpus_file)
    healed = next(row for name, row in rows.items() if name.endswith("+heal"))
    assert not healed["kept"] and "the unhealed winner is kept" in healed["why"]
    assert not selection["winner"]["repair"].endswith("+heal")
    assert _kl_of_written(out, tiny_llama_dir, corpus_file) == pytest.approx(
        selection["winner"]["validation"][source]["kl"], rel=1e-4, abs=1e-6)


def test_the_budget_plan_is_the_most_candidates_that_fit():
    config = ShrinkConfig(model="m", out="o", drop=2, candidates=4, validation_windows=32, budget=0.8)
    # a window forward costs 1.5 x 0.1 s; the references 32 windows, the fits 1.25 x 10; 4 options a
    # candidate, screened on 4 windows, the 2 finalists' on the other 28:
    # 3 candidates: 0.15 x (32 + 12.5 + 4 x (3 x 4 + 2 x 28)) = 47.5 s <= 48 s; 4 candidates: 49.9 s
    plan = plan_for_budget(config, analysis_seconds=1.0, analysis_windows=10, sources=1, repairs_per_candidate=4,
                           seconds_spent=0.0)
    assert plan.candidates == 3 and plan.validation_windows == 32
    # without screening, each candidate costs its 4 options x 32 windows: 2 candidates, 45.1 s
    unscreened = plan_for_budget(dataclasses.replace(config, screen_windows=0), analysis_seconds=1.0,
                                 analysis_windows=10, sources=1, repairs_per_candidate=4, seconds_spent=0.0)
    assert unscreened.candidates == 2
    # the sums gathered in the analysis pass: the fits cost the held-out quarter alone (2.5 windows), and in
    # 49 s the 4 candidates fit (0.15 x (32 + 2.5 + 4 x (4 x 4 + 2 x 28)) = 48.4 s), where 3 fit otherwise
    roomier = dataclasses.replace(config, budget=49 / 60)
    plans = [plan_for_budget(roomier, analysis_seconds=1.0, analysis_windows=10, sources=1, repairs_per_candidate=4,
                             seconds_spent=0.0, sums_gathered=gathered) for gathered in (True, False)]
    assert [plan.candidates for plan in plans] == [4, 3]
    tight = plan_for_budget(config, analysis_seconds=100.0, analysis_windows=10, sources=1, repairs_per_candidate=4,
                            seconds_spent=30.0)
    assert tight.candidates == 1 and tight.validation_windows == FEWEST_WINDOWS and "overruns" in tight.why


def test_shrink_within_a_budget_tries_fewer_candidates(tmp_path, tiny_llama_dir, corpus_file):
    result = shrink_to(model=str(tiny_llama_dir), drop=2, data=str(corpus_file), out=str(tmp_path / "quick"),
                       budget=0.001, repairs=("none",), **SMALL)
    selection = result.provenance["selection"]
    assert selection["budget"]["candidates"] == 1 and len(selection["options"]) == 1
    assert all(scores["windows"] == FEWEST_WINDOWS for scores in selection["winner"]["validation"].values())


@pytest.mark.slow
def test_shrink_evaluates_what_it_wrote_against_the_model(capsys, tmp_path, tiny_llama_dir, corpus_file):
    out = tmp_path / "evaluated"
    argv = ["shrink", str(tiny_llama_dir), "--drop", "2", "--data", str(corpus_file), "--repairs", "none",
            "--candidates", "1", "--samples", "16", "--seq-len", "32", "--validation-windows", "8", "--dtype",
            "float32", "--tasks", "arc_easy", "--limit", "8", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "eval.json").read_text())
    task = result["retained"]["arc_easy"]
    assert task["ratio"] == pytest.approx(result["tasks"]["arc_easy"][task["metric"]]
                                          / result["baseline"]["tasks"]["arc_easy"][task["metric"]])
    assert result["model"]["location"] == str(out) and "retained" in printed


@pytest.mark.parametrize(("argv", "message"), [
    (["--heal-steps", "0"], "--heal-steps must be at least 1"),
    (["--budget", "-3"], "--budget must be a positive number of minutes"),
    (["--tasks", "no_such_task"], "no_such_task"),
    (["--heal-steps", "5", "--heal-lr", "-0.1"], "--heal-lr must be positive, got -0.1"),
    (["--heal-steps", "5", "--out", "x.gguf"], "not a .gguf file"),
])
def test_bad_heal_budget_or_tasks_is_one_line_and_nothing_is_written(capsys, tmp_path, tiny_llama_dir, corpus_file,
                                                                       argv, message):
    out = tmp_path / "out"
    argv = [str(tmp_path / a) if a.endswith(".gguf") else a for a in argv]
    code = main(["-q", "shrink", str(tiny_llama_dir), "--drop", "2", "--data", str(corpus_file), "--out", str(out),
                 "--quiet", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_default_repair_calibration_grows_with_the_hidden_size():
    from depthcut.pipeline.configs import PruneConfig
    from depthcut.pipeline.prune_repair import repair_sample_count

    default = PruneConfig(model="m", out="o", drop=2)
    assert default.samples is None and default.seq_len == 256
    # 16 tokens per row of a d x d map: 16 d / 256 sequences, never fewer than 64
    assert repair_sample_count(default, 576, ["lstsq"]) == 64  # SmolLM2-135M: 36 would do
    assert repair_sample_count(default, 2048, ["lstsq"]) == 128
    assert repair_sample_count(default, 4096, ["none", "cosine"]) == 256
    assert repair_sample_count(default, 4096, ["magnitude"]) == 64  # a scale per layer, not a map
    assert repair_sample_count(PruneConfig(model="m", out="o", drop=2, samples=8), 4096, ["lstsq"]) == 8
    assert repair_sample_count(PruneConfig(model="m", out="o", drop=2, seq_len=100), 1000, ["lstsq"]) == 160


def test_prune_records_the_grown_sample_count(tmp_path, tiny_llama_dir, corpus_file):
    from transformers import AutoConfig

    from depthcut.pipeline import prune_to

    width = AutoConfig.from_pretrained(tiny_llama_dir).hidden_size
    result = prune_to(model=str(tiny_llama_dir), layers="2:4", repair="lstsq", repair_policy="warn",
                      data=str(corpus_file), seq_len=8, dtype="float32", quiet=True, out=str(tmp_path / "p"))
    assert result.provenance["repair"]["samples"] == max(64, 16 * width // 8)


@pytest.mark.parametrize("where", ["one pass", "rows apart", "analysis"])
@pytest.mark.slow
def test_shared_passes_fit_every_repair_of_every_block_as_its_own_pass_would(tiny_llama_dir, corpus_file, monkeypatch,
                                                                            where):
    """The shrink gathers every block's sums in one pass (cosine's token rows in it, or in a pass of their
    own when they would take too much memory), or during the analysis pass (every block of the size asked
    for; the others in a pass after it): each fit equals `repair`'s alone, on that block alone."""
    import copy

    from depthcut.analysis.passes import analyze
    from depthcut.pipeline.prune_repair import repair_samples
    from depthcut.repair.run import repair
    from depthcut.selection import fits as shrink_fits

    if where == "rows apart":
        monkeypatch.setattr(shrink_fits, "SHARED_ROWS_BYTES", 0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    config = ShrinkConfig(model=str(tiny_llama_dir), out="o", drop=2, data=str(corpus_file), **SMALL)
    samples = repair_samples(config, tokenizer, model.config.hidden_size, ["lstsq"])
    blocks = [[2, 3], [4, 5], [1, 2, 3], [0, 1]]
    methods = ["lstsq", "cosine", "magnitude"]
    gathered = None
    if where == "analysis":
        gatherer = shrink_fits.every_block_gatherer(model, samples.calibration, 2, methods, config)
        num_layers = model.config.num_hidden_layers
        # every block of 2 the analysis ranks, [0, 2) with magnitude alone (lstsq has no layer -1 to fold into)
        assert set(gatherer.accumulators) == {tuple(range(f, f + 2)) for f in range(num_layers - 2)}
        assert gatherer.accumulators[(0, 1)][0].stats.methods == ("magnitude",)
        plain = analyze(model, tokenizer, samples.calibration, batch_size=config.batch_size, progress=False)
        ridden = analyze(model, tokenizer, samples.calibration, batch_size=config.batch_size, progress=False,
                         riders=[gatherer])
        assert ridden.to_dict()["metrics"] == plain.to_dict()["metrics"]  # the riders change no metric
        gathered = gatherer.result()
    fits = shrink_fits.BlockFits(model, blocks, methods, samples, config, gathered)
    assert fits.rows_shared is (where != "rows apart")
    if where == "analysis":  # the gathered sums are used as they are, cosine's rows gathered apart
        assert fits.statistics[(2, 3)] is gathered[(2, 3)]
    with pytest.raises(DepthcutError, match="layer 0"):  # refused before any pass: no layer -1 to fold into
        fits.get([0, 1], "lstsq")
    for block in blocks[:3]:
        for method in ("lstsq", "cosine", "magnitude"):
            alone = repair(copy.deepcopy(model), tokenizer, samples.calibration, block, method,
                           heldout=samples.heldout, seed=config.seed, batch_size=config.batch_size)
            fit = fits.get(block, method)
            assert fit.block == alone.block
            assert fit.error_after == pytest.approx(alone.error_after, rel=1e-6)
            assert fit.details["relative_error_heldout_after"] == pytest.approx(
                alone.details["relative_error_heldout_after"], rel=1e-6)
            if alone.transform is not None:
                torch.testing.assert_close(fit.transform, alone.transform, rtol=1e-6, atol=1e-9)
            else:
                assert fit.alpha == pytest.approx(alone.alpha, rel=1e-6)
