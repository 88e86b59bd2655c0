"""`depthcut shrink --search greedy|beam:K` and `depthcut analyze --search`: known answers on tiny
models with planted redundant layers at scattered positions, beam:1 trial for trial greedy, a beam
against an exhaustive search where greedy is trapped, the architecture's refusals obeyed at every step,
the search's cut in the decision table, its order in analysis.json and the heatmap, and bad input
refused in one line."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
from architectures import tiny_config
from tiny import tiny_model

from depthcut.analysis.calibration import build_calibration
from depthcut.analysis.result import Analysis
from depthcut.cli import main
from depthcut.errors import DepthcutError, OptionValueError
from depthcut.evaluation.divergence import WindowScores
from depthcut.io.data import load_texts
from depthcut.model.surgery import remove_layers
from depthcut.pipeline import analyze
from depthcut.pipeline.analyze import analysis_summary, analyze_to
from depthcut.pipeline.configs import AnalyzeConfig, ShrinkConfig
from depthcut.pipeline.prune import prune_to
from depthcut.pipeline.search_choice import search_width
from depthcut.pipeline.shrink import shrink_to
from depthcut.selection import search as shrink_search
from depthcut.selection.search import greedy_search, search_cost, search_order, search_trials

PLANTED = [1, 4, 6]


def _planted_llama():
    """A tiny 8-layer Llama whose layers 1, 4 and 6 write nothing into the residual stream (their output
    projections zeroed): removing them changes nothing; every other layer does work (weights scaled up)."""
    model = tiny_model("llama", num_hidden_layers=8).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.mul_(3.0)
        for index in PLANTED:
            model.model.layers[index].self_attn.o_proj.weight.zero_()
            model.model.layers[index].mlp.down_proj.weight.zero_()
    return model


def _windows(tokenizer, corpus_file, count: int = 4):
    return {"text": build_calibration(tokenizer, load_texts(str(corpus_file)), count, 24, "windows", 7)}


def test_the_greedy_search_finds_planted_scattered_layers(tokenizer, corpus_file):
    model = _planted_llama()
    config = ShrinkConfig(model="m", out="o", drop=3, screen_windows=4, batch_size=4)
    path = greedy_search(model, _windows(tokenizer, corpus_file), 3, config)
    assert sorted(path.order) == PLANTED
    assert all(step["kl"] < 1e-6 for step in path.steps)  # each removal changed nothing
    assert path.trials == 7 + 6 + 5  # every layer but the final one, then those left
    # the model is whole after every trial
    assert len(model.model.layers) == 8 and model.config.num_hidden_layers == 8
    # no contiguous block of 3 is the planted cut, and each of them changes the output
    reference = copy.deepcopy(model)
    remove_layers(reference, [4, 5, 6])
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        assert not torch.allclose(reference(ids).logits, model(ids).logits, atol=1e-3)


@pytest.mark.parametrize("search", ["greedy", "beam:2"])
def test_the_search_never_proposes_a_cut_the_architecture_refuses(tokenizer, corpus_file, search):
    """A hybrid with one attention layer, that layer planted as the most redundant: removing it would
    leave no attention layer (refused), so the search passes it over at every step."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("lfm2")
    config.layer_types = ["conv"] * 3 + ["full_attention"] + ["conv"] * 4
    config.full_attn_idxs = [3]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.model.layers[3].self_attn.out_proj.weight.zero_()
        model.model.layers[3].feed_forward.w2.weight.zero_()
    with pytest.raises(DepthcutError):
        remove_layers(copy.deepcopy(model), [3])
    shrink = ShrinkConfig(model="m", out="o", drop=3, screen_windows=2, batch_size=2, search=search)
    path = greedy_search(model, _windows(tokenizer, corpus_file, 2), 3, shrink)
    assert path.method == search
    assert len(path.order) == 3 and 3 not in path.order
    for step in range(1, 4):  # every prefix of the order is a cut the model allows
        remove_layers(copy.deepcopy(model), path.order[:step])


def _shrink_planted(tmp_path, tokenizer, corpus_file, out: str, **options):
    """A plain-cut shrink of 3 layers of the planted model (saved under tmp_path once)."""
    folder = tmp_path / "planted"
    if not folder.exists():
        _planted_llama().save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return shrink_to(model=str(folder), drop=3, data=str(corpus_file), validate=(str(corpus_file),),
                     repairs=("none",), samples=16, seq_len=24, validation_windows=6, screen_windows=3,
                     dtype="float32", quiet=True, out=str(tmp_path / out), **options)


def test_shrink_takes_the_search_cut_as_a_candidate(tmp_path, tokenizer, corpus_file):
    result = _shrink_planted(tmp_path, tokenizer, corpus_file, "small", search="greedy")
    selection = result.provenance["selection"]
    assert sorted(selection["search"]["order"]) == PLANTED and len(selection["search"]["steps"]) == 3
    winner = selection["winner"]
    assert winner["layers"] == PLANTED and result.removed == PLANTED
    rows = {(tuple(r["layers"]), r["found_by"]) for r in selection["options"]}
    # Block Influence sees the planted layers too; the search's cut is then the same candidate, said so
    assert (tuple(PLANTED), "greedy") in rows or "proposes already" in selection["search"]["why"]
    none = _shrink_planted(tmp_path, tokenizer, corpus_file, "no-search")  # the default
    assert none.provenance["selection"]["search"] == {"method": "none"}
    assert all(r["found_by"] != "greedy" for r in none.provenance["selection"]["options"])


def test_shrink_runs_a_beam_as_its_search(tmp_path, tokenizer, corpus_file):
    """`shrink --search beam:2` goes through the same call as greedy (`greedy_search` reads the width from
    the config): its path is recorded with its method and its cut wins on the planted model."""
    result = _shrink_planted(tmp_path, tokenizer, corpus_file, "small", search="beam:2")
    search = result.provenance["selection"]["search"]
    assert search["method"] == "beam:2" and sorted(search["order"]) == PLANTED
    assert search["trials"] > 7 + 6 + 5  # more than greedy's
    assert result.removed == PLANTED


def test_beam_1_is_greedy_trial_for_trial(tokenizer, corpus_file):
    """On a model without planted layers (no ties), beam:1 removes the same layers in the same order, with
    the same KL at every step and the same trials, as greedy."""
    torch.manual_seed(3)
    model = tiny_model("llama", num_hidden_layers=6).eval()
    windows = _windows(tokenizer, corpus_file, 3)
    paths = {search: greedy_search(model, windows, 3, ShrinkConfig(model="m", out="o", drop=3, screen_windows=3,
                                                                   batch_size=3, search=search))
             for search in ("greedy", "beam:1")}
    greedy, beam = paths["greedy"], paths["beam:1"]
    assert beam.order == greedy.order and beam.trials == greedy.trials == 5 + 4 + 3
    assert [step["kl"] for step in beam.steps] == [step["kl"] for step in greedy.steps]
    assert len(set(greedy.order)) == 3


def test_beam_2_finds_the_planted_scattered_layers(tokenizer, corpus_file):
    config = ShrinkConfig(model="m", out="o", drop=3, screen_windows=4, batch_size=4, search="beam:2")
    path = greedy_search(_planted_llama(), _windows(tokenizer, corpus_file), 3, config)
    assert sorted(path.order) == PLANTED and path.method == "beam:2"
    assert all(step["kl"] < 1e-6 for step in path.steps)
    # every partial cut after the first step is grown twice, each new cut scored once
    assert 7 + 6 < path.trials <= search_trials(2, 3, 8)


TRAP = [0.1, 0.2, 0.25, 0.3, 0.35]  # each layer's own cost; layer 0 alone is cheapest, and ruins every pair


def _trap_score(layers) -> float:
    return sum(TRAP[layer] for layer in layers) + (0.9 if 0 in layers and len(layers) > 1 else 0.0)


def test_a_beam_escapes_the_trap_greedy_falls_into(monkeypatch):
    """A known answer on a planted score (the KL of a cut replaced by `_trap_score`, a cut with layer 4
    refused): greedy takes layer 0 first and is stuck with it; beam:2 keeps layer 1 beside it and finds
    the best cut of every size that an exhaustive search over the allowed cuts finds."""
    tried = []

    def scores(model, layers, predictions, batch_size, **cut):
        if 4 in layers:
            raise DepthcutError("refused")
        tried.append(tuple(layers))
        return {"text": WindowScores([_trap_score(layers)], [0.0])}

    monkeypatch.setattr(shrink_search, "scores_after_cut", scores)
    model = tiny_model("llama", num_hidden_layers=6)
    greedy = search_order(model, {}, 3, "greedy", 1)
    assert greedy.order == [0, 1, 2] and greedy.steps[1]["kl"] == pytest.approx(1.2)
    tried.clear()
    beam = search_order(model, {}, 3, "beam:2", 1)
    for size in (2, 3):
        best = min(itertools.combinations(range(4), size), key=_trap_score)
        assert sorted(beam.order[:size]) == list(best)
        assert beam.steps[size - 1]["kl"] == pytest.approx(_trap_score(best))
    # each cut scored once, though two partial cuts grow into it ({0, 1} from {0} and from {1})
    assert len(tried) == len(set(tried)) == beam.trials == 4 + 5 + 3
    assert all(4 not in layers for layers in tried)


def test_the_search_is_priced_by_its_trials():
    assert search_trials(1, 3, 8) == 7 + 6 + 5
    assert search_trials(2, 3, 8) == 7 + 2 * 6 + 2 * 5
    assert search_trials(4, 2, 4) == 3 + 3 * 2  # never more partial cuts than there are
    config = ShrinkConfig(model="m", out="o", drop=8, screen_windows=4)
    greedy, beam = (search_cost(ShrinkConfig(model="m", out="o", drop=8, search=search), 8, 30, 2, 0.1)
                    for search in ("greedy", "beam:3"))
    assert greedy == pytest.approx(0.1 * 2 * config.screen_windows * (0.5 * search_trials(1, 8, 30) + 1))
    assert 2.5 < beam / greedy < 3.0


def test_search_values_are_read_and_bad_ones_refused():
    assert [search_width(text) for text in ("greedy", "beam:1", "beam:12", "none")] == [1, 1, 12, 0]
    for bad in ("beam:0", "beam:x", "beam", "beam:-1", "greedy:2", "Beam:2"):
        with pytest.raises(OptionValueError, match="--search must be greedy, beam:K"):
            ShrinkConfig(model="m", out="o", drop=2, search=bad)
        with pytest.raises(OptionValueError):
            AnalyzeConfig(model="m", data="c4", out="o", search=bad)


@pytest.mark.parametrize("argv", [
    ["shrink", "{model}", "--drop", "2", "--search", "beam:0"],
    ["shrink", "{model}", "--drop", "2", "--search", "beam:x"],
    ["shrink", "{model}", "--drop", "2", "--search", "greedy", "--layers", "1,2"],
    ["analyze", "{model}", "--data", "c4", "--search", "beam:0"],
    ["analyze", "{model}", "--data", "c4", "--search", "greedy", "--layers", "1,2"],
    ["analyze", "{model}", "--data", "{data}", "--search-drop", "2"],
])
def test_bad_search_input_is_one_line_exit_2_and_nothing_written(capsys, tmp_path, tiny_llama_dir, corpus_file, argv):
    out = tmp_path / "out"
    argv = [arg.format(model=tiny_llama_dir, data=corpus_file) for arg in argv]
    code = main([*argv, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "search" in err or "--layers" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def planted_folder(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("planted")
    _planted_llama().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_analyze_search_stores_the_order_the_curve_and_a_reusable_cut(tmp_path, planted_folder, corpus_file):
    out = tmp_path / "analysis"
    analyze_to(model=str(planted_folder), data=str(corpus_file), validate=(str(corpus_file),), samples=8, seq_len=24,
               batch_size=4, validation_windows=4, dtype="float32", quiet=True, search="greedy", search_drop=4,
               out=str(out))
    stored = json.loads((out / "analysis.json").read_text())
    search = stored["search"]
    assert sorted(search["order"][:3]) == PLANTED and len(search["order"]) == 4 and search["method"] == "greedy"
    assert [step["layer"] for step in search["steps"]] == search["order"]
    assert all(step["kl"] < 1e-6 for step in search["steps"][:3]) and search["steps"][3]["kl"] > 1e-3
    # beside it, the best block by angular distance of each size, scored on the same windows: no block of 3
    # is the planted cut, so its KL is above the search's
    blocks = search["blocks"]
    assert [point["size"] for point in blocks] == [1, 2, 3, 4]
    best = Analysis.load(out / "analysis.json")
    assert [point["block"] for point in blocks] == [list(best.best_block(n)) for n in range(1, 5)]
    assert blocks[2]["kl"] > 1e-3
    assert best.search == search  # read back as written
    assert (out / "heatmap.png").stat().st_size > 1000
    # the order is reusable: prune's `search` strategy takes its first k, as the printed --layers line says
    lines = analysis_summary(best, out)
    assert f"  k= 3: --layers {','.join(map(str, PLANTED))}  " in "\n".join(lines)
    pruned = prune_to(model=str(planted_folder), analysis=str(out / "analysis.json"), strategy="search", drop=3,
                      dtype="float32", quiet=True, out=str(tmp_path / "pruned"))
    assert pruned.removed == PLANTED
    with pytest.raises(DepthcutError, match="removed 4 layers; --drop 5 needs a deeper one"):
        prune_to(model=str(planted_folder), analysis=str(out / "analysis.json"), strategy="search", drop=5,
                 dtype="float32", quiet=True, out=str(tmp_path / "deeper"))


def test_a_search_deeper_than_the_model_is_refused_before_the_analysis(tmp_path, planted_folder, corpus_file,
                                                                     monkeypatch):
    monkeypatch.setattr(analyze, "run_analysis", lambda *args, **kwargs: pytest.fail("the analysis ran"))
    with pytest.raises(DepthcutError, match="--search-drop must be between 1 and 7 for a model of 8 layers"):
        analyze_to(model=str(planted_folder), data=str(corpus_file), search="greedy", search_drop=8, dtype="float32",
                   quiet=True, out=str(tmp_path / "deep"))
    assert not (tmp_path / "deep").exists()


def test_analyze_search_beam_2_finds_the_planted_layers(tmp_path, planted_folder, corpus_file):
    out = tmp_path / "beam"
    analysis = analyze_to(model=str(planted_folder), data=str(corpus_file), validate=(str(corpus_file),), samples=8,
                          seq_len=24, batch_size=4, validation_windows=4, dtype="float32", quiet=True,
                          search="beam:2", search_drop=3, out=str(out))
    assert sorted(analysis.search["order"]) == PLANTED and analysis.search["method"] == "beam:2"
    assert (out / "heatmap.png").stat().st_size > 1000


def test_the_search_strategy_needs_a_searched_analysis(tmp_path, planted_folder, corpus_file):
    out = tmp_path / "plain"
    analysis = analyze_to(model=str(planted_folder), data=str(corpus_file), samples=8, seq_len=24, batch_size=4,
                          dtype="float32", quiet=True, out=str(out))
    assert analysis.search is None and "search" not in json.loads((out / "analysis.json").read_text())
    with pytest.raises(DepthcutError, match="no search order: run `depthcut analyze --search greedy`"):
        prune_to(model=str(planted_folder), analysis=str(out / "analysis.json"), strategy="search", drop=2,
                 dtype="float32", quiet=True, out=str(tmp_path / "pruned"))
