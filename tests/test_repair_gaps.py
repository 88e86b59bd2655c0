"""A repair for every gap (depthcut.repair.gaps): planted linear maps across two gaps recovered exactly,
each gap fitted on the stream the earlier repairs give (against a cut-and-repair done by hand), a single
gap fitted as before, two repaired gaps written by `prune` (in memory, streamed, GGUF) reloaded with plain
transformers, and refusals."""

import copy
import json

import pytest
import torch
import transformers as T
from tiny import padded_calibration, random_ids, tiny_model

import depthcut
from depthcut.cli import main
from depthcut.errors import DepthcutError
from depthcut.model.layers import find_layer_stack
from depthcut.repair import apply_repair, fit_repair, repair, repair_statistics
from depthcut.repair.gaps import apply_gaps, fit_gaps, gap_runs, gaps_folded

pytestmark = pytest.mark.filterwarnings("ignore:config field 'max_window_layers'")

NUM_LAYERS = 8
REMOVED = [2, 3, 5, 6]  # two gaps: [2, 4) repaired in layer 1, [5, 7) in layer 4
# The residual stream (d = 32) is split: layer 1's MLP alone writes dims 16..23 and layer 4's alone 24..31,
# so that a planted layer of a gap reads its repair's m (the MLP output of the layer before the gap) exactly.
WRITTEN_BY = {(2, 4): slice(16, 24), (5, 7): slice(24, 32)}
SMALL_ARGS = ["--samples", "32", "--seq-len", "16", "--batch-size", "4", "--dtype", "float32", "--quiet"]


def _calibration(seed=3):
    return padded_calibration((16, 11, 16, 9, 16, 14, 16, 12, 16, 16, 13, 16), seed)


def _relative(a, b) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def _planted_forward(rows: slice, update: torch.Tensor):
    """A decoder layer's forward that adds (its input's `rows` dims) @ `update`: a fixed linear map of m."""

    def forward(hidden_states, *args, **kwargs):
        return hidden_states + hidden_states[..., rows] @ update

    return forward


@torch.no_grad()
def _planted_model():
    """A float64 Llama of 8 layers whose gaps' layers each add m @ B_j (m: the MLP output of the layer
    before the gap; B_j writes only dims 0..15), so that removing the gap is exactly undone by the map
    T = I + sum_j B_j on m, folded into the layer before it. Returns (model, {gap: planted T})."""
    model = tiny_model("llama", num_hidden_layers=NUM_LAYERS).double()
    layers = model.model.layers
    model.model.embed_tokens.weight[:, 16:] = 0
    for index, layer in enumerate(layers):
        layer.self_attn.o_proj.weight[16:] = 0
        down = layer.mlp.down_proj.weight  # (d, k): row i writes dim i
        own = next((rows for (first, _), rows in WRITTEN_BY.items() if first - 1 == index), None)
        keep = torch.zeros(32, dtype=torch.bool)
        keep[own if own is not None else slice(0, 16)] = True
        down[~keep] = 0
    generator = torch.Generator().manual_seed(5)
    planted = {}
    for (first, stop), rows in WRITTEN_BY.items():
        transform = torch.eye(32, dtype=torch.float64)
        for index in range(first, stop):
            update = torch.zeros(8, 32, dtype=torch.float64)
            update[:, :16] = torch.randn(8, 16, generator=generator, dtype=torch.float64) / 2
            transform[rows] += update
            layers[index].forward = _planted_forward(rows, update)
        planted[(first, stop)] = transform
    return model, planted


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_gap_runs_split_a_cut_into_its_runs():
    assert gap_runs([11, 3, 9, 4, 10], 12) == [(3, 5), (9, 12)]
    assert gap_runs([5], 8) == [(5, 6)] and gap_runs(range(2, 6), 8) == [(2, 6)]
    with pytest.raises(DepthcutError, match="more than once"):
        gap_runs([3, 3], 8)


def test_lstsq_per_gap_recovers_planted_maps_and_the_unpruned_model():
    model, planted = _planted_model()
    ids = random_ids(batch=3, length=16)
    unpruned = _logits(model, ids)
    fits = fit_gaps(model, REMOVED, "lstsq", _calibration())
    assert [fit.block for fit in fits] == list(WRITTEN_BY) and {fit.num_layers for fit in fits} == {NUM_LAYERS}
    for fit, ((first, stop), rows) in zip(fits, WRITTEN_BY.items()):
        # m is zero outside `rows`: only those rows of T act (the least-norm solution leaves the others 0)
        torch.testing.assert_close(fit.transform[rows], planted[(first, stop)][rows], rtol=0, atol=1e-9)
        assert fit.error_before > 1e-2 and fit.error_after < 1e-12
    assert _logits(model, ids).equal(unpruned)  # fit_gaps leaves the model as it was
    plain = depthcut.prune(copy.deepcopy(model), REMOVED)
    assert _relative(_logits(plain, ids), unpruned) > 1e-2
    apply_gaps(model, fits)
    depthcut.prune(model, REMOVED)
    # RMSNorm rounds to float32 whatever the model's dtype: equal up to that
    assert _relative(_logits(model, ids), unpruned) < 1e-6


@pytest.mark.parametrize(("arch", "method", "options"), [
    ("llama", "lstsq", {}), ("llama", "magnitude", {}), ("llama", "cosine", {"steps": 5}),
    ("gpt2", "lstsq", {}),  # a Conv1D projection and learned positions
    ("qwen3", "lstsq", {}),  # per-layer attention kinds: the partly cut model keeps each layer's own
])
def test_each_gap_is_fitted_on_the_stream_the_earlier_repairs_give(arch, method, options):
    """Against the same done by hand: gap 1 fitted and folded, its layers cut, then gap 2 fitted on that model."""
    kinds = {"layer_types": ["sliding_attention", "full_attention"] * (NUM_LAYERS // 2)} if arch == "qwen3" else {}
    model = tiny_model(arch, num_hidden_layers=NUM_LAYERS, **kinds).double()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    calibration = _calibration()
    fits = fit_gaps(model, REMOVED, method, calibration, batch_size=5, **options)
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    assert len(find_layer_stack(model)) == NUM_LAYERS and model.config.get_text_config().num_hidden_layers == NUM_LAYERS

    by_hand = copy.deepcopy(model)
    first = fit_repair(method, repair_statistics(by_hand, calibration, [2, 3], [method], batch_size=5), **options)
    apply_repair(by_hand, first)
    depthcut.prune(by_hand, [2, 3])
    second = fit_repair(method, repair_statistics(by_hand, calibration, [3, 4], [method], batch_size=5), **options)
    unrepaired = fit_repair(method, repair_statistics(model, calibration, [5, 6], [method], batch_size=5), **options)
    for fit, reference in zip(fits, (first, second)):
        assert fit.error_before == pytest.approx(reference.error_before, rel=1e-9)
        assert fit.error_after == pytest.approx(reference.error_after, rel=1e-9)
    if method == "magnitude":
        assert fits[1].alpha == pytest.approx(second.alpha, rel=1e-12)
        assert abs(fits[1].alpha - unrepaired.alpha) > 1e-4 * abs(unrepaired.alpha)
    else:
        assert _relative(fits[1].transform, second.transform) < 1e-9
        assert _relative(fits[1].transform, unrepaired.transform) > 1e-3  # the stream of the cut model differs
    assert fits[1].block == (5, 7) and fits[1].details["fitted_after_gaps"] == [[2, 4]]
    assert fits[1].as_dict()["layers"] == [5, 6] and "fitted_after_gaps" not in fits[0].details

    # folded in turn into the unpruned model, then cut: what the hand-made model gives after its second fit
    ids = random_ids()
    with gaps_folded(model, fits):
        folded = {name: value.clone() for name, value in model.state_dict().items()}
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    apply_gaps(model, fits)
    assert all(torch.equal(value, folded[name]) for name, value in model.state_dict().items())
    depthcut.prune(model, REMOVED)
    apply_repair(by_hand, second)
    depthcut.prune(by_hand, [3, 4])
    assert _relative(_logits(model, ids), _logits(by_hand, ids)) < 1e-6


@pytest.mark.parametrize("method", ["lstsq", "magnitude"])
def test_a_single_gap_is_fitted_as_before(method):
    model = tiny_model("llama")
    calibration, heldout = _calibration(), _calibration(seed=11)
    (fit,) = fit_gaps(model, [2, 3], method, calibration, heldout, batch_size=4, seed=2)
    reference = repair(model, None, calibration, range(2, 4), method, heldout=heldout, batch_size=4, seed=2, fold=False)
    assert fit.as_dict().keys() == reference.as_dict().keys()
    assert fit.as_dict() == reference.as_dict()  # every number of the record, the ridge path included
    if method == "lstsq":
        assert torch.equal(fit.transform, reference.transform)


def test_two_repaired_gaps_reload_with_plain_transformers(tmp_path):
    model = tiny_model("llama", num_hidden_layers=NUM_LAYERS)
    apply_gaps(model, fit_gaps(model, REMOVED, "lstsq", _calibration()))
    depthcut.prune(model, REMOVED)
    model.save_pretrained(tmp_path)
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = random_ids()
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), rtol=0, atol=1e-5)
    assert reloaded.config.num_hidden_layers == NUM_LAYERS - len(REMOVED)


@pytest.mark.parametrize(("layers", "method", "message"), [
    ([0, 1, 4], "lstsq", "layer 0"),  # the first gap starts at layer 0: no layer before it to carry the map
    ([2, 4], "lsq", "Did you mean"),
])
def test_a_refused_gap_is_refused_before_any_pass(layers, method, message):
    model = tiny_model("llama")
    with pytest.raises(DepthcutError, match=message):
        fit_gaps(model, layers, method, _calibration())


def _in_memory_reference(folder, corpus_file, layers, method):
    """The model `prune --repair` writes, made here from its parts: the repair's samples, one fit per gap,
    folded, cut."""
    from depthcut.pipeline.configs import PruneConfig
    from depthcut.pipeline.prune_repair import repair_samples

    model = T.AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = T.AutoTokenizer.from_pretrained(folder)
    config = PruneConfig(model=str(folder), layers=",".join(map(str, layers)), repair=method, data=str(corpus_file),
                         out="unused", samples=32, seq_len=16, batch_size=4, quiet=True)
    samples = repair_samples(config, tokenizer, 32, [method])
    apply_gaps(model, fit_gaps(model, layers, method, samples.calibration, samples.heldout, batch_size=4))
    return depthcut.prune(model, layers)


def test_prune_repairs_every_gap_and_the_written_model_is_the_in_memory_one(capsys, tmp_path, tiny_llama_dir,
                                                                            corpus_file):
    out = tmp_path / "two-gaps"
    assert main(["prune", str(tiny_llama_dir), "--layers", "1,2,4", "--repair", "lstsq", "--data", str(corpus_file),
                 "--repair-policy", "warn", "--out", str(out), *SMALL_ARGS]) == 0
    printed = capsys.readouterr().out
    assert "gap [1, 3)" in printed and "gap [4, 5)" in printed
    record = json.loads((out / "depthcut.json").read_text())["repair"]
    assert [gap["block"] for gap in record["gaps"]] == [[1, 3], [4, 5]] and record["layers"] == [1, 2, 4]
    assert record["applied"] and record["method"] == "lstsq"
    assert record["relative_error_before"] == pytest.approx(
        sum(gap["relative_error_before"] for gap in record["gaps"]) / 2)
    assert all(gap["relative_error_after"] < gap["relative_error_before"] for gap in record["gaps"])
    reloaded = T.AutoModelForCausalLM.from_pretrained(out).eval()
    reference = _in_memory_reference(tiny_llama_dir, corpus_file, [1, 2, 4], "lstsq")
    ids = random_ids()
    torch.testing.assert_close(_logits(reloaded, ids), _logits(reference, ids), rtol=0, atol=1e-5)
    plain = depthcut.prune(T.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), [1, 2, 4])
    assert _relative(_logits(reloaded, ids), _logits(plain, ids)) > 1e-3


@pytest.mark.parametrize("stream", [[], ["--stream"]])
def test_prune_refuses_a_gap_it_cannot_repair_in_one_line(capsys, tmp_path, tiny_llama_dir, corpus_file, stream):
    """The first gap starts at layer 0 (the second, [3, 5), could be repaired): refused, nothing written."""
    code = main(["prune", str(tiny_llama_dir), "--layers", "0,3,4", "--repair", "lstsq", "--data", str(corpus_file),
                 "--out", str(tmp_path / "x"), *SMALL_ARGS, *stream])
    err = capsys.readouterr().err
    refusal = [line for line in err.splitlines() if "refused" in line]
    assert code == 2 and len(refusal) == 1 and "layer 0" in refusal[0] and "Traceback" not in err
    assert "repairing" not in err  # refused before the repair's data is read
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("method", ["lstsq", "magnitude"])
def test_a_streamed_prune_repairs_every_gap_as_the_in_memory_one(tmp_path, tiny_llama_dir, corpus_file, method):
    """--stream: gap 2's stream runs gap 1's layers as identities and folds gap 1's fit as its modules load;
    the model written equals the in-memory one, tensor for tensor (magnitude folds both gaps' factors into
    the writers before the first gap)."""
    from safetensors.torch import load_file

    from depthcut.pipeline.prune import prune_to

    options = {"model": str(tiny_llama_dir), "layers": "1,2,4", "repair": method, "data": str(corpus_file),
               "dtype": "float32", "repair_policy": "warn", "samples": 32, "seq_len": 16, "batch_size": 4, "quiet": True}
    streamed = prune_to(**options, stream=True, out=str(tmp_path / "streamed"))
    in_memory = prune_to(**options, out=str(tmp_path / "in-memory"))
    assert streamed.provenance["backend"] == "shard_by_shard" and in_memory.provenance["backend"] == "in_memory"
    ours, reference = streamed.provenance["repair"], in_memory.provenance["repair"]
    assert len(ours["gaps"]) == len(reference["gaps"]) == 2
    for gap, expected in zip(ours["gaps"], reference["gaps"]):
        assert gap["block"] == expected["block"]
        for key in ("relative_error_before", "relative_error_after", "relative_error_heldout_before",
                    "relative_error_heldout_after"):
            assert gap[key] == pytest.approx(expected[key], rel=1e-5), key
    a, b = load_file(tmp_path / "streamed" / "model.safetensors"), load_file(tmp_path / "in-memory" / "model.safetensors")
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    # lstsq: layer 0's and layer 3's MLP output projections; magnitude: the embeddings and both writers of
    # layers 0 (before gap 1) and 0, 3 (before gap 2, layers 1 and 2 being cut)
    assert len(ours["changed_tensors"]) == {"lstsq": 2, "magnitude": 1 + 2 * 4}[method]


def test_several_fits_folded_into_a_gguf_give_the_in_memory_repair(tmp_path):
    """Two gaps fitted on a GGUF model streamed, folded (dequantized) into the tensors they change, written as
    GGUF: transformers loads it with the logits of the same repair done in memory on the dequantized model."""
    import gguf
    from test_gguf import load_gguf, tiny_gguf

    from depthcut.model.gguf_surgery import prune_gguf
    from depthcut.repair.streamed import folded_tensors, streamed_fit_gaps

    source = tiny_gguf(tmp_path, "llama", gguf.GGMLQuantizationType.F32)
    calibration, layers = _calibration(), [1, 2, 4]
    fits = streamed_fit_gaps(source, calibration, layers, "lstsq", dtype=torch.float32, batch_size=4)
    changed = folded_tensors(source, fits)
    assert sorted(changed) == ["blk.0.ffn_down.weight", "blk.3.ffn_down.weight"]
    prune_gguf(source, tmp_path / "repaired.gguf", layers, replaced=changed)

    model = load_gguf(source)
    reference = fit_gaps(model, layers, "lstsq", calibration, batch_size=4)
    for fit, expected in zip(fits, reference):
        assert fit.block == expected.block and _relative(fit.transform, expected.transform) < 1e-4
    apply_gaps(model, reference)
    depthcut.prune(model, layers)
    ids = random_ids()
    torch.testing.assert_close(_logits(load_gguf(tmp_path / "repaired.gguf"), ids), _logits(model, ids),
                               rtol=0, atol=1e-4)
