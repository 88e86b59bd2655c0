"""Every architecture in transformers' causal-LM mapping that can be built tiny: each cut gives a model
equal to the original with the removed layers bypassed (reloaded with plain `from_pretrained`, no
weight missing or unused, cached generation equal to uncached), or is refused with one line and
nothing written. In memory and shard by shard. Architectures that cannot be built tiny are
skipped with the reason (docs/architectures.md lists both; `python tests/architectures.py` writes it)."""

from __future__ import annotations

import pytest
import torch
from architectures import CUTS, NotTiny, build_tiny, cached_generation_matches, check_cut, random_ids, saved_folder
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

ARCHITECTURES = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
# Families people prune, and the MoE and hybrid models whose configs describe layers in other ways:
# some cut of each must be exact, not only refused.
MUST_CUT = {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox", "falcon",
            "qwen2_moe", "qwen3_moe", "deepseek_v3", "glm4_moe", "ernie4_5_moe", "llama4_text", "jamba", "bamba",
            "nemotron_h", "mixtral", "olmoe", "gpt_oss", "qwen3_next", "lfm2", "granitemoehybrid", "smollm3"}
# Shard by shard, the cuts that differ most (the first layer, a block of whole periods): the same
# config rules run on both paths, so the other cuts would add time and no coverage.
STREAMED_CUTS = ("first", "block")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matrices: a second thread only adds contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tokenizer):
    """name -> (the tiny model, its saved folder, whether it generates the same with a cache);
    skips an architecture that cannot be built tiny or does not run on a CPU."""
    cache: dict = {}
    root = tmp_path_factory.mktemp("architectures")

    def get(name: str):
        if name not in cache:
            try:
                model = build_tiny(name)
                with torch.no_grad():
                    model(input_ids=random_ids(), use_cache=False)
                cache[name] = (model, saved_folder(name, model, tokenizer, root), cached_generation_matches(model))
            except NotTiny as error:
                cache[name] = f"cannot be built tiny: {error}"
            except Exception as error:  # noqa: BLE001
                cache[name] = f"does not run on a CPU when tiny: {type(error).__name__}: {str(error)[:120]}"
        if isinstance(cache[name], str):
            pytest.skip(cache[name])
        return cache[name]

    return get


@pytest.mark.parametrize("backend", ["memory", "stream"])
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_cut_is_exact_or_refused(name, backend, built, tmp_path):
    model, folder, generates = built(name)
    outcomes = {}
    for cut, spec in CUTS.items():
        if backend == "stream" and cut not in STREAMED_CUTS:
            continue
        try:
            outcomes[cut] = check_cut(model, folder, spec, tmp_path / cut, stream=backend == "stream",
                                      original_generates=generates)
        except AssertionError as error:
            raise AssertionError(f"{name}, --layers {spec} ({cut}), {backend}: {error}") from None
    if name in MUST_CUT:
        assert any(outcome == "exact" for outcome in outcomes.values()), outcomes


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_analysis_runs_and_streams_or_refuses(name, built, corpus_file, tmp_path):
    """`analyze` works on every architecture that prunes and records each layer's kind; `--stream`
    gives the same distances, or refuses with one line."""
    from depthcut.errors import DepthcutError
    from depthcut.model.layer_kinds import layer_kinds
    from depthcut.pipeline.analyze import analyze_to

    model, folder, _ = built(name)
    options = dict(model=str(folder), data=str(corpus_file), samples=4, seq_len=16, batch_size=2, dtype="float32",
                   metrics=("angular_last_token", "block_influence"), quiet=True)
    try:
        in_memory = analyze_to(**options, out=str(tmp_path / "memory"))
    except DepthcutError as error:  # an architecture whose layers depthcut cannot find: refused, one line
        assert "\n" not in str(error) and not (tmp_path / "memory").exists()
        return
    assert in_memory.metadata["layer_kinds"] == layer_kinds(model)
    distances = _matrix(in_memory.metrics["angular_last_token"])
    size = distances.shape[1]
    rows, firsts = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    defined = firsts + rows + 1 <= size  # row n-1, column l: the block [l, l+n) ends inside the stack
    assert torch.isfinite(distances[defined]).all() and torch.isnan(distances[~defined]).all()
    try:
        streamed = analyze_to(**options, out=str(tmp_path / "stream"), stream=True)
    except DepthcutError as error:
        assert "\n" not in str(error) and not (tmp_path / "stream").exists()
        return
    torch.testing.assert_close(_matrix(streamed.metrics["angular_last_token"]), distances, rtol=1e-4, atol=1e-4,
                               equal_nan=True)
    assert streamed.metadata["layer_kinds"] == in_memory.metadata["layer_kinds"]


def _matrix(rows) -> torch.Tensor:
    """An analysis matrix (None where a block would run past the last layer) as a tensor, NaN there."""
    return torch.tensor([[float("nan") if v is None else v for v in row] for row in rows], dtype=torch.float64)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_repair_works_or_refuses(name, built, corpus_file, tmp_path):
    """`prune --repair lstsq` on every architecture that prunes: a model that reloads with every
    weight used and finite logits, or one refusal line and nothing written."""
    from transformers import AutoModelForCausalLM

    from depthcut.errors import DepthcutError
    from depthcut.pipeline.prune import prune_to

    _, folder, _ = built(name)
    out = tmp_path / "repaired"
    try:
        prune_to(model=str(folder), layers="2:6", repair="lstsq", data=str(corpus_file), samples=8, seq_len=16,
                 batch_size=4, dtype="float32", out=str(out), quiet=True, validation_windows=2, repair_policy="warn")
    except DepthcutError as error:
        assert "\n" not in str(error) and not out.exists()
        return
    reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        assert torch.isfinite(reloaded.eval()(input_ids=random_ids(), use_cache=False).logits).all()
