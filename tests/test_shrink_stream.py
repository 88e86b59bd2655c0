"""`depthcut shrink --stream` (the layer-major shrink) against the in-memory shrink: the same decision table
(every option's KL and loss, what was kept, the winner) and the same model written, on tiny models of
several families (dense, sliding-window hybrid, tied GPT-2, mixture of experts, a Mamba hybrid) saved as
safetensors folders, and on the real SmolLM2 GGUF; the layer-major scoring against the in-memory
scoring, trial by trial; and what it refuses, in one line with nothing written."""

from __future__ import annotations

import copy as copy_module

import pytest
import torch
from architectures import build_tiny
from tiny import tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from depthcut.analysis.calibration import build_calibration
from depthcut.cli.main import main
from depthcut.evaluation.divergence import window_scores
from depthcut.evaluation.streamed_scores import Trial, stream_scores
from depthcut.io.data import load_texts
from depthcut.model.surgery import remove_layers
from depthcut.pipeline.configs import ShrinkConfig
from depthcut.pipeline.prune_repair import repair_samples
from depthcut.pipeline.shrink import shrink_to
from depthcut.pipeline.validation import references, scores_after_cut, validation_sets
from depthcut.repair import apply_repair, repair, repair_folded
from depthcut.repair.gaps import apply_gaps, fit_gaps
from depthcut.repair.reach import first_changed_layer

SMALL = {"samples": 16, "seq_len": 16, "validation_windows": 8, "screen_windows": 4, "candidates": 3,
         "dtype": "float32", "quiet": True, "batch_size": 4}


def _saved(tmp_path, model, tokenizer):
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _same_table(memory: dict, streamed: dict) -> None:
    rows = [(o["layers"], o["repair"]) for o in memory["options"]]
    assert rows == [(o["layers"], o["repair"]) for o in streamed["options"]]
    for a, b in zip(memory["options"], streamed["options"], strict=True):
        assert (a["refused"] is None) == (b["refused"] is None), (a, b)
        assert (a["kept"], a["screened"], a["decided_by"]) == (b["kept"], b["screened"], b["decided_by"]), (a, b)
        if a["score"] is None:
            assert b["score"] is None
            continue
        assert b["score"] == pytest.approx(a["score"], rel=1e-4, abs=1e-7)
        for name, summary in a["validation"].items():
            assert b["validation"][name]["loss"] == pytest.approx(summary["loss"], rel=1e-5)
    assert (memory["winner"]["layers"], memory["winner"]["repair"]) == (
        streamed["winner"]["layers"], streamed["winner"]["repair"])


FAMILIES = {
    "llama": lambda: tiny_model("llama", num_hidden_layers=8),
    "qwen3": lambda: tiny_model("qwen3"),
    "gpt2": lambda: tiny_model("gpt2"),
    "granitemoe": lambda: build_tiny("granitemoe"),  # a mixture of experts stored as the model holds it
    "falcon_h1": lambda: build_tiny("falcon_h1"),  # Mamba and attention in every layer
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_layer_major_shrink_gives_the_in_memory_table_and_model(tmp_path, corpus_file, family):
    folder = _saved(tmp_path, FAMILIES[family](), tiny_tokenizer())
    # cosine (fitted by Adam steps: the slowest) on one family; the others every repair but it
    repairs = {} if family == "llama" else {"repairs": ("none", "lstsq", "magnitude")}
    options = {"model": str(folder), "drop": 2, "data": str(corpus_file), "validate": (str(corpus_file),), **SMALL,
               **repairs}
    memory = shrink_to(out=str(tmp_path / "memory"), **options)
    streamed = shrink_to(out=str(tmp_path / "streamed"), stream=True, **options)
    selection = streamed.provenance["selection"]
    _same_table(memory.provenance["selection"], selection)
    assert selection["streamed"]["walks"] >= 1 and selection["peak_memory_bytes"] > 0
    ids = torch.randint(3, 90, (2, 12))
    written = [AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype=torch.float32).eval()
               for name in ("memory", "streamed")]
    with torch.no_grad():
        torch.testing.assert_close(written[1](ids).logits, written[0](ids).logits, rtol=1e-5, atol=1e-5)


def test_every_trial_scores_as_the_in_memory_scoring_does(tmp_path, corpus_file, device):
    """Known answer: the in-memory scoring of each cut (and of a repaired one) is what one walk gives, on
    the test device (the suite's --device: CUDA where the GPU check runs it)."""
    model, tokenizer = tiny_model("llama", num_hidden_layers=8).eval(), tiny_tokenizer()
    folder = _saved(tmp_path, model, tokenizer)
    model.to(device)
    texts = load_texts(str(corpus_file))
    sets = {"text": build_calibration(tokenizer, texts, 6, 16, "windows", 1, allow_fewer=True)}
    calibration = build_calibration(tokenizer, texts, 16, 16, "windows", 2, allow_fewer=True)
    cuts = [[2, 3], [3, 4], [1, 4], [6]]
    fit = repair(model, tokenizer, calibration, [3, 4], "lstsq", fold=False, batch_size=4)
    predictions = references(model, sets, 4, cuts)
    expected = [scores_after_cut(model, cut, predictions, 4) for cut in cuts]
    with repair_folded(model, fit):
        expected.append(scores_after_cut(model, [3, 4], predictions, 4))
    # a magnitude scale folds into every writer before the block, the embeddings too: the known answer is a
    # copy of the model really scaled and cut, run from its embeddings
    scale = repair(model, tokenizer, calibration, [3, 4], "magnitude", fold=False, batch_size=4)
    copy = apply_repair(copy_module.deepcopy(model), scale)
    remove_layers(copy, [3, 4])
    expected.append({"text": window_scores(copy, predictions["text"], 4)})
    with repair_folded(model, scale):
        in_memory = scores_after_cut(model, [3, 4], predictions, 4, changed_from=first_changed_layer(model, scale))
    assert in_memory["text"].kl == pytest.approx(expected[-1]["text"].kl, rel=1e-5)
    trials = [Trial(tuple(cut)) for cut in cuts] + [Trial((3, 4), (fit,)), Trial((3, 4), (scale,))]
    streamed_references, scored = stream_scores(folder, sets, trials, batch_size=4, dtype=torch.float32,
                                                device=device, progress=False, memory_limit=1)  # a batch a walk
    assert streamed_references["text"].loss == pytest.approx(predictions["text"].loss, rel=1e-6)
    for want, got in zip(expected, scored, strict=True):
        assert got["text"].kl == pytest.approx(want["text"].kl, rel=1e-4 if device.type == "cuda" else 1e-5, abs=1e-8)
        assert got["text"].loss == pytest.approx(want["text"].loss, rel=1e-6)


@pytest.mark.parametrize(("argv", "message"), [
    (["--heal-steps", "2"], "--heal-steps trains the winner in memory"),
    (["--search", "greedy"], "is not layer-major yet"),
    (["--tasks", "retained"], "--tasks loads both models whole"),
    (["--device-map", "auto"], "--stream and --device-map exclude each other"),
])
def test_what_the_layer_major_shrink_does_not_do_is_one_line(capsys, tmp_path, tiny_llama_dir, corpus_file, argv,
                                                             message):
    out = tmp_path / "out"
    code = main(["-q", "shrink", str(tiny_llama_dir), "--data", str(corpus_file), "--out", str(out), "--drop", "2",
                 "--stream", "--quiet", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_stream_needs_safetensors_weights(capsys, tmp_path, corpus_file):
    folder = tmp_path / "model"
    tiny_model("llama").save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer().save_pretrained(folder)
    for weights in folder.glob("*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))  # weights, but not safetensors: nothing to stream from
    out = tmp_path / "out"
    code = main(["-q", "shrink", str(folder), "--data", str(corpus_file), "--out", str(out), "--drop", "2",
                 "--stream", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "--stream needs a local folder of safetensors weights" in err, err
    assert not out.exists()


def test_experts_converted_on_load_are_refused_in_one_line(capsys, tmp_path, corpus_file):
    """Mixtral's checkpoint holds one tensor per expert, the model one fused tensor: not streamed."""
    folder = _saved(tmp_path, build_tiny("mixtral"), tiny_tokenizer())
    out = tmp_path / "out"
    code = main(["-q", "shrink", str(folder), "--data", str(corpus_file), "--out", str(out), "--drop", "2",
                 "--stream", "--quiet", "--samples", "8", "--seq-len", "16"])
    err = capsys.readouterr().err
    assert code == 2 and "converted on load" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_device_map_shrinks_through_accelerate_as_in_memory(tmp_path, tiny_llama_dir, corpus_file):
    """--device-map on a machine with the CPU only: accelerate places the whole model there; same choice."""
    options = {"model": str(tiny_llama_dir), "drop": 2, "data": str(corpus_file), "validate": (str(corpus_file),),
               **SMALL}
    plain = shrink_to(out=str(tmp_path / "plain"), **options)
    mapped = shrink_to(out=str(tmp_path / "mapped"), device_map="auto", **options)
    _same_table(plain.provenance["selection"], mapped.provenance["selection"])


@pytest.mark.slow
def test_the_smollm2_gguf_shrinks_layer_major_as_in_memory(tmp_path):
    """The real GGUF, dequantized a tensor at a time, to a .gguf --out: the in-memory table."""
    options = {"model": "smollm2-135m", "drop": 4, "samples": 8, "seq_len": 32, "validation_windows": 6,
               "screen_windows": 3, "candidates": 2, "repairs": ("none", "lstsq"), "dtype": "float32",
               "quiet": True, "validate": ("c4",)}
    memory = shrink_to(out=str(tmp_path / "memory.gguf"), **options)
    streamed = shrink_to(out=str(tmp_path / "streamed.gguf"), stream=True, **options)
    _same_table(memory.provenance["selection"], streamed.provenance["selection"])
    ids = torch.randint(3, 1000, (1, 16))
    written = [AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=name, dtype=torch.float32).eval()
               for name in ("memory.gguf", "streamed.gguf")]
    with torch.no_grad():
        torch.testing.assert_close(written[1](ids).logits, written[0](ids).logits)


def _quiet_layers_llama(quiet=(1, 4, 6), scale=0.05):
    """A tiny 8-layer Llama whose layers 1, 4 and 6 write little into the stream (their output projections
    scaled down): Block Influence picks them, a scattered cut whose gaps a repair can still improve."""
    model = tiny_model("llama", num_hidden_layers=8).eval()
    with torch.no_grad():
        for index in quiet:
            model.model.layers[index].self_attn.o_proj.weight.mul_(scale)
            model.model.layers[index].mlp.down_proj.weight.mul_(scale)
    return model


def test_a_scattered_cut_is_repaired_gap_by_gap_in_memory_and_layer_major(tmp_path, corpus_file):
    model = _quiet_layers_llama()
    folder = _saved(tmp_path, model, tiny_tokenizer())
    options = {"model": str(folder), "drop": 3, "data": str(corpus_file), "validate": (str(corpus_file),),
               **SMALL, "repairs": ("none", "lstsq", "magnitude"), "screen_windows": 0}
    memory = shrink_to(out=str(tmp_path / "memory"), **options)
    streamed = shrink_to(out=str(tmp_path / "streamed"), stream=True, **options)
    _same_table(memory.provenance["selection"], streamed.provenance["selection"])
    rows = {(tuple(o["layers"]), o["repair"]): o for o in memory.provenance["selection"]["options"]}
    for method in ("lstsq", "magnitude"):
        row = rows[((1, 4, 6), method)]
        assert row["refused"] is None and row["score"] is not None, row  # was: "needs one contiguous block"
    # the known answer: the scattered cut repaired gap by gap, really cut, scored from its embeddings
    shrink = ShrinkConfig(out=str(tmp_path / "x"), **options)  # the shrink's own split of the data
    samples = repair_samples(shrink, tiny_tokenizer(), 32, shrink.repairs)
    sets = validation_sets(shrink, tiny_tokenizer(), samples.held_out)
    fits = fit_gaps(model, [1, 4, 6], "lstsq", samples.calibration, samples.heldout, batch_size=shrink.batch_size,
                    seed=shrink.seed)
    cut = apply_gaps(copy_module.deepcopy(model), fits)
    remove_layers(cut, [1, 4, 6])
    predictions = references(model, sets, shrink.batch_size)
    want = window_scores(cut, predictions[str(corpus_file)], shrink.batch_size).summary()["kl"]
    assert rows[((1, 4, 6), "lstsq")]["validation"][str(corpus_file)]["kl"] == pytest.approx(want, rel=1e-5)


def test_a_parameter_budget_counts_a_tied_head_once_layer_major(tmp_path, corpus_file):
    """GPT-2 ties its head to the embeddings: --params must reach the same drop with --stream as in memory."""
    folder = _saved(tmp_path, tiny_model("gpt2"), tiny_tokenizer())
    total = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(folder).parameters())
    per_layer = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(folder).transformer.h[0].parameters())
    options = {"model": str(folder), "params": str(total - 2 * per_layer), "data": str(corpus_file),
               "validate": (str(corpus_file),), **SMALL, "repairs": ("none",)}
    memory = shrink_to(out=str(tmp_path / "memory"), **options)
    streamed = shrink_to(out=str(tmp_path / "streamed"), stream=True, **options)
    assert len(memory.removed) == len(streamed.removed) == 2
