"""`depthcut shrink`: every candidate cut tried plain and with each repair, scored on validation text
no fit saw, a repair kept only beyond the noise, and the model written the one the table scored."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from depthcut.analysis.calibration import build_calibration
from depthcut.cli import main
from depthcut.errors import DepthcutError
from depthcut.evaluation.divergence import (
    WindowScores,
    paired_difference,
    reference_predictions,
    window_scores,
)
from depthcut.io.data import load_texts, split_documents
from depthcut.pipeline.configs import ShrinkConfig
from depthcut.pipeline.prune_repair import HELDOUT_FRACTION
from depthcut.pipeline.shrink import _decide, shrink_to
from depthcut.pipeline.validation import judge, validation_sets
from depthcut.selection.decision import Option, refinements, standing
from depthcut.selection.decision_table import decision_table

SMALL = {"samples": 16, "seq_len": 32, "validation_windows": 8, "dtype": "float32", "quiet": True}


def scores(kl: list[float]) -> dict:
    return {"text": WindowScores(kl=kl, loss=[1.0] * len(kl))}


def test_a_repair_is_kept_only_beyond_the_noise_of_the_paired_windows():
    plain = [0.50, 0.40, 0.60, 0.45, 0.55, 0.50]
    options = [
        Option([2, 3], "angular", "none", scores(plain)),
        # better on every window by about 0.2: far beyond 2 standard errors
        Option([2, 3], "angular", "lstsq", scores([k - 0.2 + 0.01 * (i % 2) for i, k in enumerate(plain)])),
        # better on average by 0.01, but by +-0.1 window to window: noise
        Option([2, 3], "angular", "cosine", scores([k - 0.01 + (0.1 if i % 2 else -0.1) for i, k in enumerate(plain)])),
        # worse everywhere
        Option([2, 3], "angular", "magnitude", scores([k + 0.05 for k in plain])),
        Option([3, 4], "deepest", "none", scores([k + 0.1 for k in plain])),
    ]
    config = ShrinkConfig(model="m", out="o", drop=2, margin=2.0)
    winner = _decide(options, config)
    assert [o.kept for o in options] == [True, True, False, False, True]
    assert winner is options[1] and "kept" in winner.why and "plain cut is kept" in options[2].why
    gain, stderr = paired_difference(plain, options[1].scores["text"].kl)
    assert gain == pytest.approx(0.2 - 0.005) and gain > 2 * stderr
    # with several sources, "worst" asks every source to show the gain
    mixed = [Option([2, 3], "angular", "none", {"a": WindowScores(plain, plain), "b": WindowScores(plain, plain)}),
             Option([2, 3], "angular", "lstsq", {"a": WindowScores([k - 0.2 for k in plain], plain),
                                                 "b": WindowScores([k + 0.01 for k in plain], plain)})]
    assert _decide(mixed, ShrinkConfig(model="m", out="o", drop=2, aggregate="worst")) is mixed[0]
    assert _decide(mixed, ShrinkConfig(model="m", out="o", drop=2, aggregate="mean")) is mixed[1]


def test_cosine_is_fitted_only_where_the_lstsq_map_it_refines_beats_the_plain_cut():
    plain = [0.50, 0.40, 0.60, 0.45, 0.55, 0.50]
    options = [
        Option([2, 3], "angular", "none", scores(plain)),
        Option([2, 3], "angular", "lstsq", scores([k - 0.2 + 0.01 * (i % 2) for i, k in enumerate(plain)])),
        Option([2, 3], "angular", "cosine"),
        Option([4, 5], "deepest", "none", scores(plain)),
        Option([4, 5], "deepest", "lstsq", scores([k + 0.05 for k in plain])),  # worse than the plain cut
        Option([4, 5], "deepest", "cosine"),
        Option([1, 2], "angular", "none", scores(plain)),
        Option([1, 2], "angular", "cosine"),  # lstsq not tried: nothing to judge it by
    ]
    config = ShrinkConfig(model="m", out="o", drop=2, margin=2.0)
    to_fit = refinements(options, config)
    assert [id(o) for o in to_fit] == [id(options[2]), id(options[7])]
    assert options[5].screened and "not fitted: it refines lstsq's map" in options[5].why
    assert not options[2].screened and not options[7].screened
    options[2].scores = scores([k - 0.1 for k in plain])  # as scoring would leave them
    options[7].scores = scores([k + 0.1 for k in plain])
    assert _decide(options, config) is options[1] and not options[5].kept  # left out: not a candidate


def test_cosine_is_not_fitted_where_the_leading_option_beats_the_lstsq_map_it_would_refine():
    plain = [0.50, 0.40, 0.60, 0.45, 0.55, 0.50]
    wobble = [0.01 * (i % 2) for i in range(len(plain))]
    options = [
        Option([2, 3], "angular", "none", scores(plain)),
        Option([2, 3], "angular", "lstsq", scores([k - 0.30 + w for k, w in zip(plain, wobble)])),  # the leader
        Option([2, 3], "angular", "cosine"),
        # beats its own plain cut, but is 0.18 to 0.2 behind the leader on every window: far beyond 2 standard errors
        Option([4, 5], "angular", "none", scores(plain)),
        Option([4, 5], "angular", "lstsq", scores([k - 0.10 - w for k, w in zip(plain, wobble)])),
        Option([4, 5], "angular", "cosine"),
        # behind the leader by 0.01 on average, 0.1 either way window to window: within the noise
        Option([6, 7], "angular", "none", scores(plain)),
        Option([6, 7], "angular", "lstsq", scores([k - 0.285 + (0.1 if i % 2 else -0.1) for i, k in enumerate(plain)])),
        Option([6, 7], "angular", "cosine"),
    ]
    config = ShrinkConfig(model="m", out="o", drop=2, margin=2.0)
    to_fit = refinements(options, config)
    assert [id(o) for o in to_fit] == [id(options[2]), id(options[8])]
    assert options[5].screened and "which the leading option (layers [2, 4), lstsq) beats" in options[5].why
    gain, stderr = paired_difference(options[4].scores["text"].kl, options[1].scores["text"].kl)
    assert gain == pytest.approx(0.19) and f"+{gain:.4f} ± {stderr:.4f}" in options[5].why
    # a plain cut leads where no repair beats its own: the margin is taken against that plain cut
    options = [Option([2, 3], "angular", "none", scores([k - 0.5 for k in plain])),
               Option([4, 5], "angular", "none", scores(plain)),
               Option([4, 5], "angular", "lstsq", scores([k - 0.1 - w for k, w in zip(plain, wobble)])),
               Option([4, 5], "angular", "cosine")]
    assert refinements(options, config) == [] and "layers [2, 4), none" in options[3].why


def test_validation_text_from_the_calibration_corpus_is_its_held_out_documents(tmp_path, tokenizer):
    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while", "depth", "pruning", "removes", "layers"]
    rows = [" ".join(random.Random(i).sample(words, len(words)) * 3) for i in range(40)]  # 40 distinct documents
    corpus = tmp_path / "distinct.jsonl"
    corpus.write_text("".join(json.dumps({"text": row}) + "\n" for row in rows))
    fitted_on, held_out = split_documents(load_texts(str(corpus)), HELDOUT_FRACTION, 0)
    assert held_out.documents and not set(fitted_on.documents) & set(held_out.documents)
    config = ShrinkConfig(model="m", out="o", drop=2, data=str(corpus), validate=(str(corpus), str(corpus) + "x"),
                          seq_len=32, validation_windows=4)
    with pytest.raises(DepthcutError, match="not found"):  # another source is read whole: here, none such
        validation_sets(config, tokenizer, held_out)
    config = ShrinkConfig(model="m", out="o", drop=2, data=str(corpus), validate=(str(corpus),), seq_len=32,
                          validation_windows=4)
    windows = validation_sets(config, tokenizer, held_out)[str(corpus)]
    expected = build_calibration(tokenizer, held_out, 4, 32, "windows", config.seed + 1, allow_fewer=True)
    assert torch.equal(windows.input_ids, expected.input_ids)
    fitted = build_calibration(tokenizer, fitted_on, 4, 32, "windows", config.seed + 1, allow_fewer=True)
    assert not torch.equal(windows.input_ids, fitted.input_ids)


@pytest.mark.slow
def test_shrink_writes_the_model_its_table_scored(tmp_path, tiny_llama_dir, corpus_file):
    out = tmp_path / "smaller"
    result = shrink_to(model=str(tiny_llama_dir), drop=2, data=str(corpus_file), validate=(str(corpus_file),),
                       out=str(out), **SMALL)
    selection = result.provenance["selection"]
    rows = selection["options"]
    tried = {(tuple(r["layers"]), r["repair"]) for r in rows}
    for layers, _ in tried:
        assert {(layers, m) for m in ("none", "lstsq", "cosine", "magnitude")} <= tried
    kept = [r for r in rows if r["kept"]]
    winner = selection["winner"]
    source = str(corpus_file)
    assert winner["validation"][source]["kl"] == min(r["validation"][source]["kl"] for r in kept)
    assert result.removed == winner["layers"] and json.loads((out / "depthcut.json").read_text())["selection"]
    # what shrink_to returns is what it wrote
    assert json.loads(json.dumps(result.provenance)) == json.loads((out / "depthcut.json").read_text())
    # the model written is the one scored: its KL from the original on the same windows is the table's
    original = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    written = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    config = ShrinkConfig(model=str(tiny_llama_dir), out=str(out), drop=2, data=source, validate=(source,), **SMALL)
    _, held_out = split_documents(load_texts(source), HELDOUT_FRACTION, config.seed)
    windows = validation_sets(config, tokenizer, held_out)[source]
    again = window_scores(written, reference_predictions(original, windows)).summary()
    assert again["kl"] == pytest.approx(winner["validation"][source]["kl"], rel=1e-4, abs=1e-6)
    assert written.config.num_hidden_layers == 4


@pytest.mark.parametrize(("argv", "message"), [
    (["--drop", "2", "--fraction", "0.3"], "not allowed with argument"),
    (["--fraction", "1.5"], "--fraction must be between 0 and 1"),
    (["--drop", "2", "--validate", "no-such-corpus"], "no-such-corpus"),
    (["--drop", "2", "--repairs", "none,lstq"], "Did you mean 'lstsq'"),
    (["--drop", "9"], "--drop must be between 1 and 5"),
])
def test_bad_input_is_one_line_and_nothing_is_written(capsys, tmp_path, tiny_llama_dir, corpus_file, argv, message):
    out = tmp_path / "out"
    code = main(["-q", "shrink", str(tiny_llama_dir), "--data", str(corpus_file), "--out", str(out), "--samples", "8",
                 "--seq-len", "16", "--validation-windows", "2", "--quiet", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_gguf_out_needs_a_gguf_model(tmp_path, tiny_llama_dir, corpus_file):
    with pytest.raises(DepthcutError, match="only from a GGUF model"):
        shrink_to(model=str(tiny_llama_dir), drop=2, data=str(corpus_file), out=str(tmp_path / "x.gguf"), **SMALL)
    assert not (tmp_path / "x.gguf").exists()


def test_a_parameter_budget_is_the_fewest_layers_that_reach_it(tiny_llama_dir):
    from depthcut.pipeline.shrink import drop_for_params, parse_count

    assert parse_count("100M") == 100_000_000 and parse_count("1.5B") == 1_500_000_000
    assert parse_count("95000000") == 95_000_000 and parse_count("20k") == 20_000
    with pytest.raises(DepthcutError, match="is not a count"):
        parse_count("lots")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    total = sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in model.model.layers[0].parameters())  # the tiny Llama's layers are alike
    assert drop_for_params(model, None, total - layer) == 1
    assert drop_for_params(model, None, total - layer - 1) == 2
    assert drop_for_params(model, None, total - 5 * layer) == 5
    with pytest.raises(DepthcutError, match="out of reach: removing all but one of the 6 layers"):
        drop_for_params(model, None, total - 6 * layer)
    with pytest.raises(DepthcutError, match="already no more than"):
        drop_for_params(model, None, total)


def test_shrink_to_a_parameter_budget(tmp_path, tiny_llama_dir, corpus_file):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    total = sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    result = shrink_to(model=str(tiny_llama_dir), params=str(total - 2 * layer), data=str(corpus_file),
                       repairs=("none",), out=str(tmp_path / "budget"), **SMALL)
    assert len(result.removed) == 2 and result.provenance["parameters_after"] <= total - 2 * layer


@pytest.mark.parametrize(("stored", "dtype"), [(torch.float32, "float32"), (torch.bfloat16, "auto"),
                                               (torch.float32, "bfloat16")])
def test_a_plain_winner_is_written_as_scored_in_the_dtype_it_was_scored_in(
        monkeypatch, tmp_path, tokenizer, corpus_file, stored, dtype):
    """The model written is the model scored: loaded once, in the dtype the candidates were scored in (a
    float32 folder shrunk in bfloat16 is written in bfloat16, not copied in its stored float32), equal
    to `prune --layers` of the same cut in that dtype, and recorded so."""
    from tiny import tiny_model

    from depthcut.model.precision import choose_dtype
    from depthcut.pipeline import common, prune_to

    folder = tmp_path / "model"
    tiny_model("llama").to(stored).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    computed = choose_dtype(dtype, "cpu", stored).dtype
    calls = []
    real = common.load_model_announced
    monkeypatch.setattr(common, "load_model_announced", lambda *a, **k: calls.append(a) or real(*a, **k))
    result = shrink_to(model=str(folder), drop=2, data=str(corpus_file), repairs=("none",),
                       out=str(tmp_path / "shrunk"), **{**SMALL, "dtype": dtype})
    assert len(calls) == 1
    assert result.provenance["selection"]["winner"]["repair"] == "none"
    name = str(computed).removeprefix("torch.")
    reference = prune_to(model=str(folder), layers=",".join(map(str, result.removed)), dtype=name,
                         out=str(tmp_path / "pruned"), quiet=True)
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "shrunk", dtype="auto").state_dict()
    expected = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", dtype="auto").state_dict()
    assert written.keys() == expected.keys()
    assert all(written[k].dtype == computed and torch.equal(written[k], expected[k]) for k in expected)
    assert result.provenance["dtype"] == name == reference.provenance["dtype"]
    for key in ("parameters_before", "parameters_after"):
        assert result.provenance[key] == reference.provenance[key]


def test_the_shrink_says_the_sizes_before_and_after_and_when_a_gguf_would_be_smaller(tmp_path):
    """Sizes from the files themselves; a GGUF input written as a larger folder says so, with the .gguf estimate."""
    from depthcut.selection.decision_table import expectation_lines, size_lines

    (tmp_path / "in.gguf").write_bytes(b"x" * 1_000_000)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"y" * 3_000_000)
    (out / "tokenizer.json").write_bytes(b"z" * 500_000)  # not a weight file
    provenance = {"base_model": {"location": str(tmp_path), "gguf_file": "in.gguf"}, "dtype": "bfloat16",
                  "output": {"format": "safetensors", "path": str(out)}, "parameters_before": 135_000_000,
                  "parameters_after": 108_000_000, "removed_layers": [12, 13, 14, 15, 16, 17], "num_layers_before": 30,
                  "selection": {"winner": {"repair": "lstsq", "score": 1.23}}}
    text = " ".join(line.strip() for line in size_lines(provenance))
    assert "135.0M -> 108.0M parameters (20% fewer); on disk 1.0 MB (GGUF) -> 3.0 MB (safetensors, bfloat16)" in text
    assert "--out NAME.gguf keeps the quantization (about 0.8 MB)" in text
    (out / "model.safetensors").write_bytes(b"y" * 800_000)  # smaller than the input: nothing to say
    assert len(size_lines(provenance)) == 1
    advice = " ".join(line.strip() for line in expectation_lines(provenance, "small"))
    assert "6 of 30 layers removed (20%)" in advice and "KL from the unpruned model is 1.23 nats" in advice
    assert "0.6 to 1.5 kept 73-92% of arc_easy" in advice and "depthcut heal small --data c4 --steps 50" in advice
    provenance["selection"]["winner"]["repair"] = "lstsq+heal"
    assert "depthcut heal" not in " ".join(expectation_lines(provenance, "small"))


def _two_sources(kl_a, kl_b, loss_a, loss_b) -> dict:
    return {"c4": WindowScores(list(kl_a), list(loss_a)), "wikitext": WindowScores(list(kl_b), list(loss_b))}


BASE = [0.50, 0.40, 0.60, 0.45, 0.55, 0.50, 0.42, 0.58]
LOSS = [3.0, 3.2, 2.9, 3.1, 3.05, 2.95, 3.15, 3.0]


def _shifted(values, by, wobble=0.0):
    return [v + by + (wobble if i % 2 else -wobble) for i, v in enumerate(values)]


def test_a_repair_that_lowers_the_kl_but_raises_a_sources_loss_is_not_kept_and_the_loss_decides():
    """Do no harm on the loss too: the planted lstsq lowers the KL on both sources far beyond the noise,
    but raises WikiText's loss by 0.02 on every window; the plain cut is kept, and the table says the
    loss decided. Its twin that raises no loss is kept."""
    plain = Option([2, 3], "angular", "none", _two_sources(BASE, BASE, LOSS, LOSS))
    harmful = Option([2, 3], "angular", "lstsq", _two_sources(_shifted(BASE, -0.1, 0.005), _shifted(BASE, -0.1, 0.005),
                                                              LOSS, _shifted(LOSS, 0.02, 0.001)))
    other_plain = Option([4, 5], "angular", "none", _two_sources(_shifted(BASE, 0.05), _shifted(BASE, 0.05), LOSS, LOSS))
    helpful = Option([4, 5], "angular", "lstsq", _two_sources(_shifted(BASE, -0.02, 0.001), _shifted(BASE, -0.02, 0.001),
                                                              _shifted(LOSS, -0.01, 0.001), LOSS))
    options = [plain, harmful, other_plain, helpful]
    config = ShrinkConfig(model="m", out="o", drop=2, margin=2.0)
    winner = _decide(options, config)
    assert not harmful.kept and harmful.decided_by == "loss" and "higher beyond 2 standard errors on wikitext" in harmful.why
    assert helpful.kept and helpful.decided_by == "kl and loss"
    # the harmful map had the lowest KL of all: without the loss guard it would have won
    assert harmful.score("worst") < min(o.score("worst") for o in options if o is not harmful)
    assert winner is helpful  # the lowest KL of those kept
    selection = {"validation": {"c4": {}, "wikitext": {}}, "options": [o.row() for o in options],
                 "winner": winner.row(), "runner_up": standing(options, winner, config)}
    table = "\n".join(decision_table(selection))
    harmful_row = next(line for line in table.splitlines() if line.split()[:4] == ["[2,", "4)", "angular", "lstsq"])
    assert harmful_row.endswith("no (loss)")
    winner_row = next(line for line in table.splitlines() if line.startswith("*"))
    assert winner_row.split()[1:5] == ["[4,", "6)", "angular", "lstsq"]


def test_a_scattered_cut_must_beat_the_best_plain_block_on_kl_and_loss():
    """A cut that is not one block (Block Influence's, a search's) is chosen over the best plain block only
    where it lowers the KL beyond the margin and raises no source's loss beyond it."""
    block = Option([3, 4], "angular", "none", _two_sources(BASE, BASE, LOSS, LOSS))
    worse_block = Option([5, 6], "deepest", "none", _two_sources(_shifted(BASE, 0.3), _shifted(BASE, 0.3), LOSS, LOSS))
    scattered = Option([1, 5], "block-influence", "none",
                       _two_sources(_shifted(BASE, -0.05, 0.002), _shifted(BASE, -0.05, 0.002),
                                    _shifted(LOSS, 0.03, 0.001), LOSS))
    config = ShrinkConfig(model="m", out="o", drop=2)
    assert _decide([block, worse_block, scattered], config) is block
    assert not scattered.kept and scattered.decided_by == "loss" and "best plain block [3, 5)'s" in scattered.why
    assert worse_block.kept  # a plain block is never judged against another
    scattered.scores["c4"] = WindowScores(scattered.scores["c4"].kl, _shifted(LOSS, -0.01, 0.001))
    assert _decide([block, worse_block, scattered], config) is scattered and scattered.decided_by == "kl and loss"
    # level on the KL: the best block stays
    scattered.scores = _two_sources(_shifted(BASE, -0.001, 0.05), _shifted(BASE, -0.001, 0.05), LOSS, LOSS)
    assert _decide([block, worse_block, scattered], config) is block and scattered.decided_by == "kl"


def test_judge_against_a_naive_paired_computation():
    """The verdict's figures are the paired mean differences and their standard errors over windows."""
    baseline = _two_sources(BASE, BASE, LOSS, LOSS)
    candidate = _two_sources(_shifted(BASE, -0.1, 0.01), _shifted(BASE, -0.1, 0.01), _shifted(LOSS, 0.004, 0.02), LOSS)
    verdict = judge(baseline, candidate, 2.0, "worst")
    rises = [c - b for c, b in zip(candidate["c4"].loss, LOSS)]
    mean = sum(rises) / len(rises)
    stderr = (sum((r - mean) ** 2 for r in rises) / (len(rises) - 1) / len(rises)) ** 0.5
    assert f"c4: {mean:+.4f} ± {stderr:.4f}" in verdict.why
    assert mean < 2 * stderr and verdict.better and verdict.decided_by == "kl and loss"  # a rise within the noise
    assert not judge(baseline, candidate, 0.0, "worst").better  # any rise counts at margin 0
    assert judge(baseline, candidate, 0.0, "worst").decided_by == "loss"


def test_the_decision_table_marks_the_winner_shows_the_rank_score_and_wraps_reasons():
    plain = Option([2, 3], "angular", "none", _two_sources(BASE, BASE, LOSS, LOSS))
    level = Option([4, 5], "angular", "none", _two_sources(_shifted(BASE, 0.001, 0.05), _shifted(BASE, 0.001, 0.05),
                                                           LOSS, LOSS))
    long_reason = "this cut is refused because " + "the architecture says so " * 12 + "END"
    refused = Option([0, 1], "angular", "none", refused=long_reason)
    config = ShrinkConfig(model="m", out="o", drop=2)
    options = [refused, level, plain]
    winner = _decide(options, config)
    selection = {"validation": {"c4": {}, "wikitext": {}}, "options": [o.row() for o in options],
                 "winner": winner.row(), "runner_up": standing(options, winner, config)}
    lines = decision_table(selection)
    assert max(map(len, lines)) <= 118 + 10  # wrapped (a cell may overrun by its figures)
    text = " ".join(line.strip() for line in lines)
    assert long_reason in text  # wrapped, never cut
    starred = [line for line in lines if line.startswith("*")]
    assert len(starred) == 1 and "[2, 4)" in starred[0] and f"{plain.score('worst'):.4f}" in starred[0]
    assert "runner-up: layers [4, 6)" in text and "level with it within the noise" in text


def test_by_default_a_cut_is_judged_on_held_out_data_and_a_second_domain_where_the_data_folder_has_one(
        tmp_path, monkeypatch, corpus_file):
    data = str(corpus_file)
    assert ShrinkConfig(model="m", out="o", drop=2, data=data).validation_sources() == (data, "wikitext")
    assert ShrinkConfig(model="m", out="o", drop=2, data="wikitext").validation_sources() == ("wikitext", "c4")
    assert ShrinkConfig(model="m", out="o", drop=2, data=data, validate=(data,)).validation_sources() == (data,)
    (tmp_path / "c4").mkdir()  # a data folder without WikiText-2: the held-out documents alone
    monkeypatch.setenv("DEPTHCUT_DATA_DIR", str(tmp_path))
    assert ShrinkConfig(model="m", out="o", drop=2).validation_sources() == ("c4",)


def test_a_loss_no_higher_than_the_unpruned_models_is_no_harm():
    """A baseline cut that happens to lower the loss below the unpruned model's (a random model) does not
    make a cut that leaves the loss where the unpruned model has it harmful."""
    unpruned = {"c4": _shifted(LOSS, 0.0), "wikitext": list(LOSS)}
    baseline = _two_sources(BASE, BASE, _shifted(LOSS, -0.3, 0.001), LOSS)
    candidate = _two_sources(_shifted(BASE, -0.4, 0.001), _shifted(BASE, -0.4, 0.001), _shifted(LOSS, 0.0, 0.001), LOSS)
    assert judge(baseline, candidate, 2.0, "worst").decided_by == "loss"  # against the baseline alone: harm
    verdict = judge(baseline, candidate, 2.0, "worst", unpruned=unpruned)
    assert verdict.better and verdict.decided_by == "kl and loss"
    raised = _two_sources(_shifted(BASE, -0.4, 0.001), _shifted(BASE, -0.4, 0.001), _shifted(LOSS, 0.05, 0.001), LOSS)
    assert judge(baseline, raised, 2.0, "worst", unpruned=unpruned).decided_by == "loss"  # above both
