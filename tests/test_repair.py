"""Training-free repair (depthcut.repair): fitted maps against naive references, folds against the
unfolded computation, refusals, and round trips through plain transformers."""

import pytest
import torch
import transformers as T
from tiny import padded_calibration, random_ids, tiny_model

import depthcut
from depthcut.analysis.calibration import CalibrationSet
from depthcut.errors import DepthcutError
from depthcut.model.layers import find_layer_stack, first_tensor, output_tensor
from depthcut.repair import REPAIRS, RepairStatistics, apply_repair, fit_repair, repair, repair_statistics
from depthcut.repair.architectures import architecture_of

pytestmark = pytest.mark.filterwarnings("ignore:config field 'max_window_layers'")

FIRST, STOP = 2, 4
LINEAR_ARCHS = ["llama", "qwen2", "gpt2", "opt", "falcon", "gpt_neox", "phi3"]


def _calibration(lengths=(16, 11, 16, 9, 16, 14, 16, 12), seed=3) -> CalibrationSet:
    return padded_calibration(lengths, seed)


@torch.no_grad()
def _naive_states(model, calibration, first=FIRST, stop=STOP):
    """x_l, m_{l-1} and x_{l+n} over every non-padding token, by the test's own hooks, in float64."""
    stack = find_layer_stack(model)
    arch = architecture_of(model)
    seen = {}
    handles = [
        stack.layers[first].register_forward_pre_hook(
            lambda mod, args, kwargs: seen.__setitem__("x", first_tensor(args, kwargs).double().clone()), with_kwargs=True),
        stack.layers[stop].register_forward_pre_hook(
            lambda mod, args, kwargs: seen.__setitem__("y", first_tensor(args, kwargs).double().clone()), with_kwargs=True),
    ]
    if first > 0:
        mlp = stack.layers[first - 1].get_submodule(arch.mlp)
        handles.append(mlp.register_forward_hook(
            lambda mod, args, out: seen.__setitem__("m", output_tensor(out).double().clone())))
    rows = {"x": [], "m": [], "y": []}
    try:
        for row in range(len(calibration)):
            length = int(calibration.attention_mask[row].sum())
            model(input_ids=calibration.input_ids[row : row + 1, :length], use_cache=False)
            for name, state in seen.items():  # OPT's fc2 sees (B*T, d): flatten everything alike
                rows[name].append(state.reshape(-1, state.shape[-1]))
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(value) for name, value in rows.items() if value}


@torch.no_grad()
def _entering(model, index, calibration):
    """The stream entering layer `index` of `model` over every non-padding token, float64."""
    stack = find_layer_stack(model)
    seen = []
    handle = stack.layers[index].register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(first_tensor(args, kwargs)[0].double().clone()), with_kwargs=True)
    try:
        for row in range(len(calibration)):
            length = int(calibration.attention_mask[row].sum())
            model(input_ids=calibration.input_ids[row : row + 1, :length], use_cache=False)
    finally:
        handle.remove()
    return torch.cat(seen)


def _without_norm_epsilon(model):
    for module in model.modules():
        for name in ("eps", "variance_epsilon"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 1e-300)
    return model


def _relative(a, b) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@pytest.mark.parametrize("arch", LINEAR_ARCHS)
def test_lstsq_transform_equals_naive_lstsq(arch):
    model = tiny_model(arch).double()
    calibration = _calibration()
    stats = repair_statistics(model, calibration, range(FIRST, STOP), ["lstsq"], batch_size=3)
    fit = fit_repair("lstsq", stats)
    states = _naive_states(model, calibration)
    assert stats.tokens == calibration.num_tokens == len(states["x"])
    target = states["y"] - states["x"] + states["m"]
    expected = torch.linalg.lstsq(states["m"], target, driver="gelsd").solution
    assert _relative(fit.transform, expected) < 1e-6
    pred = states["x"] - states["m"] + states["m"] @ expected
    assert fit.error_before == pytest.approx(_relative(states["x"], states["y"]) ** 2, rel=1e-9)
    assert fit.error_after == pytest.approx(_relative(pred, states["y"]) ** 2, rel=1e-6)
    # judged on other text (held out): the same closed form as the naive error there
    other = _calibration(seed=11)
    judged = repair_statistics(model, other, range(FIRST, STOP), ["lstsq"], batch_size=3)
    elsewhere = _naive_states(model, other)
    pred = elsewhere["x"] - elsewhere["m"] + elsewhere["m"] @ fit.transform
    assert fit.error_on(judged) == pytest.approx(_relative(pred, elsewhere["y"]) ** 2, rel=1e-6)
    assert fit.error_on(stats) == pytest.approx(fit.error_after, rel=1e-9)


@pytest.mark.parametrize("method", ["lstsq", "cosine"])
@pytest.mark.parametrize("arch", LINEAR_ARCHS)
def test_folded_transform_gives_the_unfolded_stream_after_pruning(arch, method):
    model = tiny_model(arch).double()
    calibration = _calibration()
    stats = repair_statistics(model, calibration, range(FIRST, STOP), [method], batch_size=4)
    fit = fit_repair(method, stats, **({"steps": 20} if method == "cosine" else {}))
    states = _naive_states(model, calibration)
    expected = states["x"] - states["m"] + states["m"] @ fit.transform  # (x_l - m) + m T
    apply_repair(model, fit)
    depthcut.prune(model, range(FIRST, STOP))
    actual = _entering(model, FIRST, calibration)
    assert _relative(actual, expected) < 1e-9
    # A real repair: the cut is closer to the original stream than plain pruning leaves it.
    assert _relative(actual, states["y"]) ** 2 == pytest.approx(fit.error_after, rel=1e-6)
    assert fit.error_after < 0.7 * fit.error_before


def test_float32_model_folds_to_within_float32_rounding():
    model = tiny_model("llama")
    calibration = _calibration()
    fit = fit_repair("lstsq", repair_statistics(model, calibration, range(FIRST, STOP), ["lstsq"]))
    states = _naive_states(model, calibration)
    expected = states["x"] - states["m"] + states["m"] @ fit.transform
    apply_repair(model, fit)
    depthcut.prune(model, range(FIRST, STOP))
    assert _relative(_entering(model, FIRST, calibration), expected) < 1e-4


def test_cosine_lowers_the_cosine_distance_of_the_lstsq_start():
    model = tiny_model("qwen2").double()
    stats = repair_statistics(model, _calibration(), range(FIRST, STOP), ["cosine"], max_rows=50, seed=1)
    assert len(stats.rows["m"]) == 50  # the kept rows are bounded
    fit = fit_repair("cosine", stats, steps=100, lr=1e-3)
    assert fit.details["cosine_distance_after"] < fit.details["cosine_distance_lstsq"]
    assert fit.as_dict()["rows"] == 50


@pytest.mark.parametrize("first", [0, FIRST])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "gpt_neox", "falcon"])
def test_magnitude_factor_and_fold(arch, first):
    model = tiny_model(arch, tie_word_embeddings=False).double()
    calibration = _calibration()
    stop = first + 2
    stats = repair_statistics(model, calibration, range(first, stop), ["magnitude"])
    fit = fit_repair("magnitude", stats)
    states = _naive_states(model, calibration, first, stop)
    alpha = states["y"].norm(dim=-1).mean() / states["x"].norm(dim=-1).mean()
    assert fit.alpha == pytest.approx(float(alpha), rel=1e-10)
    naive_error = float(((alpha * states["x"] - states["y"]) ** 2).sum() / (states["y"] ** 2).sum())
    assert fit.error_on(stats) == pytest.approx(naive_error, rel=1e-8)
    apply_repair(model, fit)
    depthcut.prune(model, range(first, stop))
    # Pre-norm layers before the cut see alpha x: the same up to their norm's epsilon ...
    assert _relative(_entering(model, first, calibration), fit.alpha * states["x"]) < 1e-3
    # ... and the same without it, to float32 rounding (RMSNorm computes in float32 even in a float64 model).
    original = _without_norm_epsilon(tiny_model(arch, tie_word_embeddings=False).double())
    exact = _naive_states(original, calibration, first, stop)["x"]
    assert _relative(_entering(_without_norm_epsilon(model), first, calibration), fit.alpha * exact) < 1e-6


@pytest.mark.parametrize(("arch", "method", "overrides"), [
    ("llama", "lstsq", {}),
    ("gpt2", "lstsq", {}),
    ("opt", "cosine", {}),
    ("gpt_neox", "magnitude", {}),
    ("gpt2", "magnitude", {"tie_word_embeddings": False}),
])
def test_repaired_pruned_model_reloads_with_plain_transformers(arch, method, overrides, tmp_path):
    model = tiny_model(arch, **overrides)
    stats = repair_statistics(model, _calibration(), range(FIRST, STOP), [method])
    apply_repair(model, fit_repair(method, stats, **({"steps": 10} if method == "cosine" else {})))
    depthcut.prune(model, range(FIRST, STOP))
    model.save_pretrained(tmp_path)
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = random_ids()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    prompt = ids[:1, :5]
    settings = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    cached = reloaded.generate(prompt, use_cache=True, **settings)
    uncached = reloaded.generate(prompt, use_cache=False, **settings)
    assert torch.equal(cached, uncached)


def test_repair_from_tokenizer_and_data(tokenizer, corpus_file):
    model = tiny_model("llama")
    before = model.model.layers[FIRST - 1].mlp.down_proj.weight.clone()
    fit = repair(model, tokenizer, str(corpus_file), range(FIRST, STOP), "lstsq", samples=8, seq_len=16)
    assert fit.as_dict()["block"] == [FIRST, STOP] and fit.tokens == 8 * 16
    assert fit.error_after < fit.error_before
    assert not torch.equal(model.model.layers[FIRST - 1].mlp.down_proj.weight, before)


@pytest.mark.parametrize(("arch", "overrides", "block", "method", "message"), [
    ("gemma2", {}, range(2, 4), "lstsq", "post_feedforward_layernorm"),
    ("gemma2", {}, range(2, 4), "cosine", "post_feedforward_layernorm"),
    ("gemma3", {"tie_word_embeddings": False}, range(2, 4), "magnitude", "post_feedforward"),
    ("gpt2", {}, range(2, 4), "magnitude", "tied"),
    ("opt", {}, range(2, 4), "magnitude", "tied"),
    ("llama", {}, range(2), "lstsq", "layer 0"),
    ("llama", {}, range(2), "cosine", "layer 0"),
    ("llama", {}, [1, 3], "lstsq", "contiguous"),
    ("llama", {}, [1, 3], "magnitude", "contiguous"),
    ("opt", {"do_layer_norm_before": False}, range(2, 4), "lstsq", "do_layer_norm_before"),
    ("llama", {}, range(2, 4), "lstsqq", "Did you mean 'lstsq'"),
])
def test_refusals(arch, overrides, block, method, message):
    model = tiny_model(arch, **overrides)
    with pytest.raises(DepthcutError, match=message):
        repair_statistics(model, _calibration(), block, [method])


def test_refuses_a_missing_mlp_output_projection():
    model = tiny_model("llama")
    del model.model.layers[FIRST - 1].mlp.down_proj
    with pytest.raises(DepthcutError, match="MLP output projection"):
        repair_statistics(model, _calibration(), range(FIRST, STOP), ["lstsq"])


def test_apply_refuses_an_already_pruned_model():
    model = tiny_model("llama")
    fit = fit_repair("lstsq", repair_statistics(model, _calibration(), range(FIRST, STOP), ["lstsq"]))
    depthcut.prune(model, range(FIRST, STOP))
    with pytest.raises(DepthcutError, match="before pruning"):
        apply_repair(model, fit)


def test_registry_and_statistics_for_another_method():
    assert REPAIRS.names() == ["cosine", "lstsq", "magnitude"]
    stats = repair_statistics(tiny_model("llama"), _calibration(), range(FIRST, STOP), ["magnitude"])
    with pytest.raises(DepthcutError, match="not 'lstsq'"):
        fit_repair("lstsq", stats)


def test_a_cut_that_reaches_the_last_layer_targets_its_output():
    model = tiny_model("llama")
    stats = repair_statistics(model, _calibration(), range(4, 6), ["lstsq", "magnitude"])
    assert stats.block == (4, 6) and stats.tokens == _calibration().num_tokens
    assert fit_repair("lstsq", stats).error_after < stats.error_before


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_streamed_statistics_equal_the_in_memory_ones_with_a_batch_across_the_held_out_rows(tmp_path, arch):
    """Layer by layer, the fitted rows [0, 5) and the held-out rows [5, 8) of one calibration set give
    the sums the in-memory pass gives on each part alone, though batch 2 holds rows of both; the
    stream stops at the cut's end."""
    from depthcut.repair.streamed import streamed_repair_statistics

    model = tiny_model(arch)
    model.save_pretrained(tmp_path)
    calibration = _calibration()
    part = lambda rows: CalibrationSet(calibration.input_ids[rows], calibration.attention_mask[rows],  # noqa: E731
                                       "part", "documents", 0)
    fitted, held = streamed_repair_statistics(tmp_path, calibration, range(FIRST, STOP), ["lstsq"], heldout_from=5,
                                              batch_size=4, dtype=torch.float32, max_rows=0)
    for streamed, rows in ((fitted, slice(0, 5)), (held, slice(5, None))):
        reference = repair_statistics(model, part(rows), range(FIRST, STOP), ["lstsq"], batch_size=4, max_rows=0)
        assert streamed.tokens == reference.tokens == int(calibration.attention_mask[rows].sum())
        for name in ("x_sq", "y_sq", "xy", "x_norm", "y_norm", "r_sq"):
            assert getattr(streamed, name) == pytest.approx(getattr(reference, name), rel=1e-5), name
        torch.testing.assert_close(streamed.mtm, reference.mtm, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(streamed.mtr, reference.mtr, rtol=1e-5, atol=1e-6)


def _sums(m: torch.Tensor, r: torch.Tensor, y: torch.Tensor) -> RepairStatistics:
    """The float64 sums a lstsq fit reads, of rows given directly (no model)."""
    m, r, y = m.double(), r.double(), y.double()
    return RepairStatistics(first=2, stop=4, num_layers=6, methods=("lstsq",), architecture="test", tokens=len(m),
                            mtm=m.T @ m, mtr=m.T @ r, r_sq=float((r * r).sum()), y_sq=float((y * y).sum()))


def test_the_ridge_is_chosen_on_held_out_sums_as_a_direct_solve_would_choose_it():
    """Few calibration rows for the map's unknowns (the case that hurt a real model): the ridge path's
    held-out errors equal those of a direct solve on the rows, and the chosen ridge is the best one,
    here a positive one (the unregularized map overfits)."""
    from depthcut.repair.lstsq import RIDGE_PATH, choose_ridge, solve

    generator = torch.Generator().manual_seed(0)
    d, true_map = 24, torch.eye(24) + 0.05 * torch.randn(24, 24, generator=torch.Generator().manual_seed(1))

    def rows(n):
        m = torch.randn(n, d, generator=generator)
        r = m @ true_map + 0.5 * torch.randn(n, d, generator=generator)
        return m, r, r + torch.randn(n, d, generator=generator)

    m, r, y = rows(20)  # fewer rows than unknowns a column
    held_m, held_r, held_y = rows(200)
    fitted, held = _sums(m, r, y), _sums(held_m, held_r, held_y)
    chosen, path = choose_ridge(fitted, held)
    scale = float((m.double().T @ m.double()).diagonal().mean())
    direct = []
    for factor, step in zip(RIDGE_PATH, path, strict=True):
        ridge = factor * scale
        assert step["ridge"] == pytest.approx(ridge)
        if ridge:
            transform = torch.linalg.solve(m.double().T @ m.double() + ridge * torch.eye(d, dtype=torch.float64),
                                           m.double().T @ r.double())
            assert torch.allclose(solve(fitted, ridge), transform, atol=1e-6)
        else:
            transform = solve(fitted, 0.0)
        error = float(((held_m.double() @ transform - held_r.double()) ** 2).sum() / (held_y.double() ** 2).sum())
        assert step["heldout_error"] == pytest.approx(error, rel=1e-6)
        direct.append(error)
    assert chosen == path[direct.index(min(direct))]["ridge"] and chosen > 0
    fit = fit_repair("lstsq", fitted, ridge=chosen)
    assert fit.error_on(held) == pytest.approx(min(direct), rel=1e-6) and min(direct) < direct[0]


def test_a_map_fitted_on_too_few_tokens_says_so(capsys):
    from depthcut.repair.run import fit_judged

    generator = torch.Generator().manual_seed(0)
    m, r = torch.randn(40, 8, generator=generator), torch.randn(40, 8, generator=generator)
    fit_judged("lstsq", _sums(m, r, r))  # 40 tokens for an 8 x 8 map: fewer than 16 x 8
    assert "lstsq fits a 8 x 8 map from 40 calibration tokens, fewer than 16 per row of the map (128)" in \
        capsys.readouterr().err
    m, r = torch.randn(200, 8, generator=generator), torch.randn(200, 8, generator=generator)
    fit_judged("lstsq", _sums(m, r, r))
    assert "calibration tokens" not in capsys.readouterr().err
