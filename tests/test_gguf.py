"""GGUF in, GGUF out (depthcut.model.gguf_surgery, depthcut.io.gguf_writer): pruned GGUFs keep every kept tensor's bytes and quantization,
slice the per-layer metadata, load in transformers with the logits of the model pruned in memory,
and run in llama.cpp; the streamed analysis reads a GGUF layer by layer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tiny import padded_calibration, random_ids, tiny_model
from transformers import AutoModelForCausalLM

from depthcut.errors import DepthcutError
from depthcut.io.gguf_files import open_gguf
from depthcut.io.gguf_writer import write_pruned
from depthcut.model.gguf_layers import plan_removal
from depthcut.model.gguf_surgery import prune_gguf
from depthcut.model.surgery import prune

Q = gguf.GGMLQuantizationType
T = gguf.GGUFValueType

# --- tiny GGUFs, converted from tiny random Hugging Face models -------------------------------------

# model name in tests/tiny.py -> (GGUF architecture, gguf.MODEL_ARCH)
ARCHS = {
    "llama": ("llama", gguf.MODEL_ARCH.LLAMA),
    "qwen2": ("qwen2", gguf.MODEL_ARCH.QWEN2),
    "gemma2": ("gemma2", gguf.MODEL_ARCH.GEMMA2),
    "gemma3": ("gemma3", gguf.MODEL_ARCH.GEMMA3),
    "phi3": ("phi3", gguf.MODEL_ARCH.PHI3),
}
# llama.cpp's Gemma 3 (and transformers reading its GGUF) makes every 6th layer global: 12 layers leave whole
# periods to remove
OVERRIDES = {"gemma3": {"num_hidden_layers": 12,
                        "layer_types": ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(12)]}}


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's Q/K permutation (transformers' GGUF loader undoes it)."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _stored(name: str, weights: np.ndarray, qtype) -> tuple[np.ndarray, object]:
    """The tensor as written: 1-D tensors stay F32 (as llama.cpp's quantizer leaves them)."""
    if weights.ndim == 1 or qtype == Q.F32:
        return weights.astype(np.float32), Q.F32
    return gguf.quants.quantize(weights.astype(np.float32), qtype), qtype


def write_tiny_gguf(model, path: Path, qtype, extra=None, split_max_tensors: int = 0) -> Path:
    """Write the tiny HF `model` as a GGUF that transformers loads back (the keys its GGUF loader reads,
    llama.cpp's tensor names and conventions), its 2-D weights in `qtype`. `extra`: key -> (value, type[, item type])."""
    config = model.config
    arch, model_arch = ARCHS[config.model_type.removesuffix("_text")]
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer = gguf.GGUFWriter(path, arch, split_max_tensors=split_max_tensors)
    writer.add_name(f"tiny {arch}")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_embedding_length(config.hidden_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(1e6 if arch == "gemma3" else 10000.0)  # Gemma 3's global layers' base
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(int(qtype) if qtype != Q.F32 else 0)
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    if arch.startswith("gemma"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_sliding_window(config.sliding_window)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    for key, spec in (extra or {}).items():
        writer.add_key_value(key, spec[0], spec[1], spec[2] if len(spec) > 2 else None)
    names = gguf.get_tensor_name_map(model_arch, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        base, suffix = hf_name.rsplit(".", 1)
        if base == "lm_head" and config.tie_word_embeddings:
            continue
        name = names.get_name(base)
        assert name is not None, hf_name
        name = f"{name}.{suffix}"
        weights = tensor.float().numpy()
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            weights = _permute(weights, heads if "attn_q" in name else kv_heads)
        if arch.startswith("gemma") and "norm.weight" in name:
            weights = weights + 1  # llama.cpp stores Gemma's norms with the offset folded in
        data, stored_type = _stored(name, weights, qtype)
        writer.add_tensor(name, data, raw_dtype=stored_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_gguf(tmp_path: Path, name: str, qtype, extra=None, **write) -> Path:
    model = tiny_model(name, **OVERRIDES.get(name, {}))
    return write_tiny_gguf(model, tmp_path / f"tiny-{name}-{qtype.name}.gguf", qtype, extra, **write)


def load_gguf(path: Path):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def per_layer_keys(arch: str, layers: int, period: int = 2) -> dict:
    """Metadata that transformers ignores but a pruner must get right: two per-layer arrays (one gguf
    names, one found by its length), a global array, and arrays outside the model's namespace."""
    return {
        f"{arch}.attention.sliding_window_pattern": ([i % period < period - 1 for i in range(layers)], T.ARRAY, T.BOOL),
        f"{arch}.layer_scales": ([0.5 + i for i in range(layers)], T.ARRAY, T.FLOAT32),
        f"{arch}.rope.dimension_sections": ([2, 2, 0, 0], T.ARRAY, T.INT32),
        "general.tags": ([f"tag{i}" for i in range(layers)], T.ARRAY, T.STRING),
    }


def raw(field) -> bytes:
    """A metadata entry's bytes as stored (key, type, value)."""
    return b"".join(part.tobytes() for part in field.parts)


def tensor_bytes(tensor) -> bytes:
    with open(tensor.path, "rb") as handle:
        handle.seek(tensor.offset)
        return handle.read(tensor.nbytes)


def no_leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name or p.name.endswith(".lock")]


# (model, quantization, layers removed): Gemma's removals keep whole periods of llama.cpp's attention pattern
CASES = [
    ("llama", Q.Q4_0, [2, 3]),
    ("llama", Q.F16, [0, 5]),
    ("qwen2", Q.Q8_0, [1, 2, 4]),
    ("gemma2", Q.F32, [2, 3]),
    ("gemma3", Q.Q4_0, [3, 4, 5, 6, 7, 8]),
    ("phi3", Q.Q8_0, [4]),
    ("phi3", Q.Q4_1, [0, 1, 2]),
]
CASE_IDS = [f"{name}-{qtype.name}" for name, qtype, _ in CASES]


def make_case(tmp_path: Path, name: str, qtype) -> Path:
    arch, layers = ARCHS[name][0], OVERRIDES.get(name, {}).get("num_hidden_layers", 6)
    period = {"gemma2": 2, "gemma3": 6}.get(name, 2)
    return tiny_gguf(tmp_path, name, qtype, per_layer_keys(arch, layers, period))


@pytest.mark.parametrize(("name", "qtype", "removed"), CASES, ids=CASE_IDS)
def test_pruned_gguf_keeps_kept_tensors_byte_for_byte_and_slices_per_layer_metadata(tmp_path, name, qtype, removed):
    source = make_case(tmp_path, name, qtype)
    out = tmp_path / "pruned.gguf"
    summary = prune_gguf(source, out, removed, provenance={"strategy": "test"})
    before, after = open_gguf(source), open_gguf(out)
    arch, layers = before.architecture, before.block_count
    kept = [i for i in range(layers) if i not in removed]
    new_index = {old: new for new, old in enumerate(kept)}

    # tensors: every kept one, renumbered, same type, shape and bytes; the removed layers' gone
    expected = {}
    for tensor in before.tensors:
        parts = tensor.name.split(".")
        if parts[0] == "blk":
            if int(parts[1]) in removed:
                continue
            parts[1] = str(new_index[int(parts[1])])
        expected[".".join(parts)] = tensor
    assert [t.name for t in after.tensors] == list(expected)
    for tensor in after.tensors:
        original = expected[tensor.name]
        assert (tensor.qtype, tensor.shape) == (original.qtype, original.shape)
        assert tensor_bytes(tensor) == tensor_bytes(original)
    assert {t.qtype for t in after.tensors} >= {qtype}

    # metadata: block count, the per-layer arrays sliced with their types, everything else as it was
    sliced = [f"{arch}.attention.sliding_window_pattern", f"{arch}.layer_scales"]
    assert after.block_count == len(kept) and after.fields[f"{arch}.block_count"].types == [T.UINT32]
    assert sorted(summary["sliced_keys"]) == sorted(sliced)
    for key in sliced:
        assert after.value(key) == [before.value(key)[i] for i in kept]
        assert after.fields[key].types == before.fields[key].types
    untouched = [key for key in before.fields if key not in sliced and key != f"{arch}.block_count"]
    assert [key for key in after.fields if not key.startswith("depthcut.")] == list(before.fields)
    for key in untouched:
        assert raw(after.fields[key]) == raw(before.fields[key]), key
    assert after.value("depthcut.removed_layers") == removed
    assert after.value("depthcut.original_block_count") == layers
    assert '"strategy": "test"' in after.value("depthcut.provenance")
    assert summary["num_layers_after"] == len(kept) and summary["file_bytes_after"] == out.stat().st_size


@pytest.mark.filterwarnings("ignore:config field 'max_window_layers'")
@pytest.mark.parametrize(("name", "qtype", "removed"), CASES, ids=CASE_IDS)
def test_pruned_gguf_loads_in_transformers_with_the_logits_of_the_model_pruned_in_memory(tmp_path, name, qtype,
                                                                                         removed):
    source = make_case(tmp_path, name, qtype)
    out = tmp_path / "pruned.gguf"
    prune_gguf(source, out, removed)
    reference = load_gguf(source)
    prune(reference, removed)
    pruned = load_gguf(out)
    assert pruned.config.num_hidden_layers == reference.config.num_hidden_layers
    assert getattr(pruned.config, "layer_types", None) == getattr(reference.config, "layer_types", None)
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(pruned(ids).logits, reference(ids).logits)


def test_a_split_gguf_is_read_as_one_model_and_written_as_one_file(tmp_path):
    whole = tiny_gguf(tmp_path, "llama", Q.Q8_0)
    (tmp_path / "split").mkdir()
    model = tiny_model("llama")
    write_tiny_gguf(model, tmp_path / "split" / "tiny.gguf", Q.Q8_0, split_max_tensors=20)
    parts = sorted((tmp_path / "split").iterdir())
    assert [p.name for p in parts] == [f"tiny-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    summary = prune_gguf(parts[1], tmp_path / "from-split.gguf", [1, 4])  # any part names the model
    prune_gguf(whole, tmp_path / "from-whole.gguf", [1, 4])
    assert summary["source_parts"] == 3 and summary["dropped_keys"] == ["split.no", "split.count",
                                                                       "split.tensors.count"]
    split, single = open_gguf(tmp_path / "from-split.gguf"), open_gguf(tmp_path / "from-whole.gguf")
    assert split.parts == [tmp_path / "from-split.gguf"] and not any(k.startswith("split.") for k in split.fields)
    assert [(t.name, tensor_bytes(t)) for t in split.tensors] == [(t.name, tensor_bytes(t)) for t in single.tensors]
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(load_gguf(tmp_path / "from-split.gguf")(ids).logits,
                           load_gguf(tmp_path / "from-whole.gguf")(ids).logits)

    parts[2].unlink()
    with pytest.raises(DepthcutError, match="split into 3 files; missing: tiny-00003-of-00003.gguf"):
        prune_gguf(parts[0], tmp_path / "x.gguf", [1])


def test_pruning_a_pruned_gguf_counts_layers_of_the_original_and_an_empty_removal_rewrites_it(tmp_path):
    source = make_case(tmp_path, "llama", Q.Q4_0)
    prune_gguf(source, tmp_path / "once.gguf", [1])
    prune_gguf(tmp_path / "once.gguf", tmp_path / "twice.gguf", [3])  # layer 3 of the pruned one is layer 4
    prune_gguf(source, tmp_path / "both.gguf", [1, 4])
    prune_gguf(tmp_path / "both.gguf", tmp_path / "rewritten.gguf", [])
    twice, both, rewritten = (open_gguf(tmp_path / f"{n}.gguf") for n in ("twice", "both", "rewritten"))
    assert twice.value("depthcut.removed_layers") == both.value("depthcut.removed_layers") == [1, 4]
    assert twice.value("depthcut.original_file") == source.name
    for model in (twice, rewritten):
        assert [(t.name, t.qtype, tensor_bytes(t)) for t in model.tensors] == \
               [(t.name, t.qtype, tensor_bytes(t)) for t in both.tensors]
        assert {k: raw(f) for k, f in model.fields.items() if k != "depthcut.provenance"} == \
               {k: raw(f) for k, f in both.fields.items() if k != "depthcut.provenance"}


# --- what layers' kinds and counts allow ------------------------------------------------------------

def test_a_removal_that_would_change_llama_cpps_attention_pattern_is_refused(tmp_path):
    source = make_case(tmp_path, "gemma2", Q.Q8_0)  # llama.cpp: layers 1, 3, 5 global (every 2nd)
    out = tmp_path / "pruned.gguf"
    with pytest.raises(DepthcutError, match=r"llama.cpp's gemma2 loader.*layer 3 would become layer 2.*"
                                            r"a multiple of 2 consecutive layers"):
        prune_gguf(source, out, [2])
    assert not out.exists() and no_leftovers(tmp_path) == []
    gemma3 = make_case(tmp_path, "gemma3", Q.Q8_0)
    with pytest.raises(DepthcutError, match="a multiple of 6 consecutive layers"):
        prune_gguf(gemma3, out, [3, 4, 5, 6])
    prune_gguf(gemma3, out, [0, 1, 2, 3, 4, 5])


def test_periods_and_layer_counts_given_in_the_metadata(tmp_path):
    counts = {"llama.attention.sliding_window_pattern": (3, T.UINT32), "llama.leading_dense_block_count": (3, T.UINT32),
              "llama.nextn_predict_layers": (1, T.UINT32)}
    source = tiny_gguf(tmp_path, "llama", Q.Q8_0, counts)
    with pytest.raises(DepthcutError, match="by llama.attention.sliding_window_pattern"):
        prune_gguf(source, tmp_path / "a.gguf", [1])
    with pytest.raises(DepthcutError, match="llama.nextn_predict_layers = 1: the last 1 layers"):
        prune_gguf(source, tmp_path / "a.gguf", [3, 4, 5])
    summary = prune_gguf(source, tmp_path / "a.gguf", [0, 1, 2])
    assert summary["recounted_keys"] == {"llama.leading_dense_block_count": [3, 0]}
    pruned = open_gguf(tmp_path / "a.gguf")
    assert pruned.value("llama.leading_dense_block_count") == 0
    assert pruned.value("llama.attention.sliding_window_pattern") == 3


# --- bad input ------------------------------------------------------------------------------------

def _expect_refusal(source, out: Path, removed, match: str, **options):
    with pytest.raises(DepthcutError, match=match):
        prune_gguf(source, out, removed, **options)
    assert not out.exists() and no_leftovers(out.parent) == []


def test_metadata_arrays_that_are_not_understood_stop_the_prune_and_are_named(tmp_path):
    source = tiny_gguf(tmp_path, "llama", Q.Q8_0, {"llama.mystery_table": ([1, 2, 3, 4], T.ARRAY, T.UINT32)})
    _expect_refusal(source, tmp_path / "out.gguf", [1], r"llama.mystery_table \(4 values\) do not hold one value per "
                                                        r"layer.*global_keys")
    prune_gguf(source, tmp_path / "out.gguf", [1], global_keys=["llama.mystery_table"])
    assert open_gguf(tmp_path / "out.gguf").value("llama.mystery_table") == [1, 2, 3, 4]


def _minimal_gguf(path: Path, arch: str, tensors: list[str], layers: int = 2) -> Path:
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(layers)
    for name in tensors:
        writer.add_tensor(name, np.ones(32, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_architectures_whose_layers_are_not_understood_are_refused_with_what_was_found(tmp_path):
    out = tmp_path / "out.gguf"
    gemma3n = _minimal_gguf(tmp_path / "g.gguf", "gemma3n", ["per_layer_token_embd.weight", "blk.0.attn_norm.weight",
                                                             "blk.1.attn_norm.weight"])
    _expect_refusal(gemma3n, out, [1], r"\(gemma3n\): its per-layer embeddings .*per_layer_token_embd")
    vision = _minimal_gguf(tmp_path / "v.gguf", "llama", ["blk.0.attn_norm.weight", "blk.1.attn_norm.weight",
                                                          "v.blk.0.ln1.weight"])
    _expect_refusal(vision, out, [1], r"layer tensors outside blk.N \(under v.blk, e.g. v.blk.0.ln1.weight\)")
    beyond = _minimal_gguf(tmp_path / "b.gguf", "llama", ["blk.0.attn_norm.weight", "blk.7.attn_norm.weight"])
    _expect_refusal(beyond, out, [1], r"tensors of layers \[7\] but llama.block_count is 2")


@pytest.mark.parametrize("cut", ["header", "tensors", "empty", "garbage"])
def test_truncated_or_corrupt_gguf_is_refused_with_its_name(tmp_path, cut):
    source = tiny_gguf(tmp_path, "llama", Q.Q4_0)
    data = source.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes({"header": data[:200], "tensors": data[: len(data) - 1000], "empty": b"",
                     "garbage": b"not a gguf file at all" * 10}[cut])
    _expect_refusal(bad, tmp_path / "out.gguf", [1], rf"{bad} is not a valid GGUF file: .*")


def test_impossible_removals_write_nothing(tmp_path):
    source = tiny_gguf(tmp_path, "llama", Q.Q8_0)
    out = tmp_path / "out.gguf"
    _expect_refusal(source, out, range(6), "cannot remove all 6 layers")
    _expect_refusal(source, out, [6], r"layer indices \[6\] are out of range: this model has 6 layers")
    with pytest.raises(DepthcutError, match="is the model being pruned"):
        prune_gguf(source, source, [1], force=True)
    out.write_bytes(b"keep me")
    with pytest.raises(DepthcutError, match="already exists"):
        prune_gguf(source, out, [1])
    assert out.read_bytes() == b"keep me"
    prune_gguf(source, out, [1], force=True)
    assert open_gguf(out).block_count == 5


def test_a_gguf_prune_from_a_model_string_records_it(tmp_path):
    from depthcut.pipeline import prune_to

    source = tiny_gguf(tmp_path, "llama", Q.Q8_0)
    result = prune_to(model=str(source), layers="2", out=str(tmp_path / "out.gguf"))
    assert result.removed == [2] and result.provenance["backend"] == "gguf"
    stored = json.loads(open_gguf(tmp_path / "out.gguf").value("depthcut.provenance"))
    assert stored["base_model"]["spec"] == str(source) and stored["removed_layers"] == [2]
    tiny_model("llama").save_pretrained(tmp_path / "hf")
    with pytest.raises(DepthcutError, match="only from a GGUF model"):
        prune_to(model=str(tmp_path / "hf"), layers="2", out=str(tmp_path / "other.gguf"))


# --- the streamed analysis reads a GGUF layer by layer --------------------------------------------

def _metric_rows(values) -> torch.Tensor:
    rows = values if isinstance(values[0], list) else [values]
    return torch.tensor([[float("nan") if v is None else v for v in row] for row in rows], dtype=torch.float64)


def assert_same_analysis(streamed, in_memory, atol: float) -> None:
    assert streamed.metrics.keys() == in_memory.metrics.keys()
    for name in in_memory.metrics:
        got, want = _metric_rows(streamed.metrics[name]), _metric_rows(in_memory.metrics[name])
        torch.testing.assert_close(got, want, atol=atol, rtol=0, equal_nan=True, msg=name)


@pytest.mark.parametrize(("name", "qtype"), [("llama", Q.Q4_0), ("gemma3", Q.Q8_0), ("phi3", Q.F16)])
def test_streamed_analysis_of_a_gguf_equals_the_in_memory_analysis(tmp_path, tokenizer, name, qtype):
    import depthcut
    from depthcut.analysis.passes import analyze_streamed

    source = tiny_gguf(tmp_path, name, qtype)
    calibration = padded_calibration([12, 9, 12, 5])
    in_memory = depthcut.analyze(load_gguf(source), data=calibration, batch_size=3, progress=False)
    streamed = analyze_streamed(str(source), tokenizer, data=calibration, batch_size=3, dtype="float32",
                                progress=False)
    assert_same_analysis(streamed, in_memory, atol=1e-5)
    assert streamed.metadata["streamed"]["resident_layers_at_most"] == 2


# --- the real SmolLM2-135M (Q4_1) and llama.cpp ---------------------------------------------------

SMOLLM2_REMOVED = list(range(12, 20))  # 8 of its 30 layers; greedy text stays readable without them
PROMPT = "The capital of France is"
# what the pruned model says greedily, in llama.cpp and (dequantized, pruned in memory) in transformers alike
PRUNED_SAYS = " the capital of the French army."


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    from depthcut.model.loading import resolve_model

    try:
        source = resolve_model("smollm2-135m")
    except DepthcutError as error:
        pytest.skip(str(error))
    return Path(source.location) / source.gguf_file


@pytest.fixture(scope="module")
def smollm2_pruned(smollm2_gguf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "smollm2-pruned.gguf"
    prune_gguf(smollm2_gguf, out, SMOLLM2_REMOVED, provenance={"strategy": "explicit"})
    return out


def llama_cpp_greedy(path: Path, tokens: int = 24) -> str:
    """Greedy completion of PROMPT by llama.cpp (xllamacpp's in-process server) on the GGUF `path`."""
    xllamacpp = pytest.importorskip("xllamacpp", reason="the llama.cpp check needs xllamacpp (pip install xllamacpp)")
    params = xllamacpp.CommonParams()
    params.model.path = str(path)
    params.n_ctx = 256
    params.warmup = False
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = 1  # busy-waiting threads crawl on a shared machine
    server = xllamacpp.Server(params)
    try:
        reply = server.handle_completions({"prompt": PROMPT, "max_tokens": tokens, "temperature": 0.0, "top_k": 1})
    finally:
        del server
    assert "choices" in reply, reply
    return reply["choices"][0]["text"]


@pytest.mark.integration
def test_smollm2_q4_1_pruned_keeps_its_quantization_byte_for_byte(smollm2_gguf, smollm2_pruned):
    before, after = open_gguf(smollm2_gguf), open_gguf(smollm2_pruned)
    assert before.block_count == 30 and after.block_count == 22
    assert {t.qtype.name for t in after.tensors} == {"Q4_1", "Q8_0", "F32"}
    source = {t.name: t for t in before.tensors}
    for tensor in after.tensors:
        name = tensor.name
        if name.startswith("blk."):
            index = int(name.split(".")[1])
            name = name.replace(f"blk.{index}.", f"blk.{index if index < 12 else index + 8}.", 1)
        assert tensor_bytes(tensor) == tensor_bytes(source[name]) and tensor.qtype == source[name].qtype
    assert len(after.tensors) == len(before.tensors) - 8 * 9  # 9 tensors per layer
    assert after.value("tokenizer.chat_template") == before.value("tokenizer.chat_template")
    assert raw(after.fields["tokenizer.ggml.tokens"]) == raw(before.fields["tokenizer.ggml.tokens"])


@pytest.mark.integration
def test_smollm2_pruned_gguf_runs_in_llama_cpp_and_survives_a_rewrite(smollm2_pruned, tmp_path):
    text = llama_cpp_greedy(smollm2_pruned)
    assert text.startswith(PRUNED_SAYS), text
    rewritten = tmp_path / "rewritten.gguf"
    prune_gguf(smollm2_pruned, rewritten, [])
    assert llama_cpp_greedy(rewritten) == text
    assert hashlib.sha256(b"".join(tensor_bytes(t) for t in open_gguf(rewritten).tensors)).digest() == \
           hashlib.sha256(b"".join(tensor_bytes(t) for t in open_gguf(smollm2_pruned).tensors)).digest()


@pytest.mark.integration
@pytest.mark.slow
def test_llama_cpp_reads_the_sliced_per_layer_arrays(smollm2_gguf, smollm2_pruned, tmp_path):
    """SmolLM2 with its head counts and FFN width as per-layer arrays (llama.cpp reads either form):
    pruned, llama.cpp must find 22 values per array and generate what the pruned original does."""
    model = open_gguf(smollm2_gguf)
    arrays = {f"llama.{key}": ([model.value(f"llama.{key}")] * 30, T.ARRAY, T.UINT32)
              for key in ("feed_forward_length", "attention.head_count", "attention.head_count_kv")}
    variant = tmp_path / "arrays.gguf"
    write_pruned(model, plan_removal(model, []), variant, arrays)
    pruned = tmp_path / "arrays-pruned.gguf"
    summary = prune_gguf(variant, pruned, SMOLLM2_REMOVED)
    assert sorted(summary["sliced_keys"]) == sorted(arrays)
    assert open_gguf(pruned).value("llama.attention.head_count") == [9] * 22
    assert llama_cpp_greedy(pruned) == llama_cpp_greedy(smollm2_pruned)

    unsliced = tmp_path / "unsliced.gguf"  # 22 layers, 30 head counts: what slicing prevents
    with_arrays = open_gguf(variant)
    plan = plan_removal(with_arrays, SMOLLM2_REMOVED)
    del plan.values["llama.attention.head_count"]
    write_pruned(with_arrays, plan, unsliced)
    with pytest.raises(RuntimeError):  # llama.cpp: "key llama.attention.head_count has wrong array length"
        llama_cpp_greedy(unsliced)


@pytest.mark.integration
def test_smollm2_streamed_analysis_of_the_gguf_equals_in_memory(smollm2_gguf):
    import depthcut
    from depthcut.analysis.passes import analyze_streamed

    model, tokenizer, _ = depthcut.load_model("smollm2-135m", dtype="float32", device="cpu")
    calibration = depthcut.build_calibration(tokenizer, depthcut.load_texts("c4"), num_samples=4, seq_len=32, seed=0)
    in_memory = depthcut.analyze(model, data=calibration, batch_size=2, progress=False)
    del model
    streamed = analyze_streamed(str(smollm2_gguf), tokenizer, data=calibration, batch_size=2, dtype="float32",
                                progress=False)
    assert_same_analysis(streamed, in_memory, atol=1e-5)


def test_the_prune_command_writes_a_gguf_when_out_ends_in_gguf(capsys, tmp_path, tokenizer):
    from depthcut.cli import main
    from depthcut.pipeline import prune_to

    source = make_case(tmp_path, "llama", Q.Q4_0)
    out = tmp_path / "pruned.gguf"
    assert main(["prune", str(source), "--layers", "2:4", "--out", str(out), "--quiet"]) == 0
    assert "per-layer metadata sliced" in capsys.readouterr().out
    again = prune_to(model=str(source), layers="2:4", out=str(tmp_path / "again.gguf"))
    assert again.removed == [2, 3] and again.provenance["num_layers_after"] == 4
    pruned, reread = gguf.GGUFReader(out), gguf.GGUFReader(tmp_path / "again.gguf")
    assert [t.name for t in pruned.tensors] == [t.name for t in reread.tensors]
    assert all(a.data.tobytes() == b.data.tobytes() for a, b in zip(pruned.tensors, reread.tensors))
    model = load_gguf(out)
    assert model.config.num_hidden_layers == 4
    # the strategy path: deepest needs no analysis; the model is never loaded
    assert main(["prune", str(source), "--drop", "2", "--strategy", "deepest", "--out", str(tmp_path / "d.gguf")]) == 0
    assert gguf.GGUFReader(tmp_path / "d.gguf").fields["llama.block_count"].parts[-1][0] == 4


@pytest.mark.parametrize(("out", "extra", "message"), [
    ("pruned.safetensors", [], "as a folder (a Hugging Face model) or as one .gguf file"),
    ("pruned.gguf", ["--stream"], "--stream is for safetensors folders"),
    ("pruned.gguf", ["--layers", "0:2", "--repair", "lstsq"], "layer 0"),  # the repair's refusal, before any work
    ("pruned.gguf", ["--repair", "lstsq"], "cannot load the tokenizer"),  # a GGUF without one: no data to fit on
])
def test_a_gguf_output_that_cannot_be_written_is_refused_first(capsys, tmp_path, out, extra, message):
    from depthcut.cli import main

    source = make_case(tmp_path, "llama", Q.Q8_0)
    layers = [] if "--layers" in extra else ["--layers", "2:4"]
    code = main(["prune", str(source), *layers, *extra, "--out", str(tmp_path / "out" / out)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_gguf_output_from_a_safetensors_model_is_refused(capsys, tmp_path, tiny_llama_dir):
    from depthcut.cli import main

    code = main(["prune", str(tiny_llama_dir), "--layers", "2:4", "--out", str(tmp_path / "x.gguf")])
    err = capsys.readouterr().err
    assert code == 2 and "only from a GGUF model" in err
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.iterdir())


@pytest.mark.integration
@pytest.mark.slow
def test_analyze_stream_reads_a_gguf_layer_by_layer_as_the_command(tmp_path, corpus_file):
    """The built-in SmolLM2 (a Q4_1 GGUF with its tokenizer), streamed from the command line."""
    from depthcut.cli import main
    from depthcut.pipeline import analyze_to

    source = "smollm2-135m"
    small = ["--samples", "2", "--seq-len", "16", "--batch-size", "2", "--dtype", "float32", "--quiet"]
    assert main(["analyze", str(source), "--stream", "--data", str(corpus_file), "--out", str(tmp_path / "s"),
                 *small]) == 0
    in_memory = analyze_to(model=str(source), data=str(corpus_file), out=str(tmp_path / "m"), samples=2, seq_len=16,
                           batch_size=2, dtype="float32", quiet=True)
    import json

    streamed = json.loads((tmp_path / "s" / "analysis.json").read_text())
    assert streamed["metadata"]["streamed"] and not in_memory.metadata.get("streamed")
    for name, values in in_memory.metrics.items():
        np.testing.assert_allclose(np.array(streamed["metrics"][name], dtype=float), np.array(values, dtype=float),
                                   atol=1e-5)


@pytest.mark.integration
def test_a_repaired_smollm2_gguf_changes_one_tensor_equals_the_in_memory_repair_and_runs_in_llama_cpp(
        smollm2_gguf, smollm2_pruned, tmp_path, shared_data):
    """lstsq on the GGUF, never loaded: statistics streamed layer by layer, the last kept MLP's down
    projection written in F32, every other tensor copied as it was. Reloaded by transformers it gives
    the logits of the same repair done in memory on the dequantized model."""
    from depthcut.pipeline import prune_to

    # 32 x 128 tokens of C4 for a 576 x 576 map: an overdetermined fit that holds on held-out text
    options = dict(layers="12:20", repair="lstsq", data="c4", samples=32, seq_len=128, batch_size=8,
                   dtype="float32", quiet=True)
    result = prune_to(model=str(smollm2_gguf), out=str(tmp_path / "repaired.gguf"), **options)
    summary, fit = result.provenance["output"], result.provenance["repair"]
    assert list(summary["replaced_tensors"]) == ["blk.11.ffn_down.weight"]
    assert summary["replaced_tensors"]["blk.11.ffn_down.weight"]["now"] == "F32"
    assert fit["changed_tensors"] == ["blk.11.ffn_down.weight"] and fit["streamed"]
    assert fit["relative_error_heldout_after"] < fit["relative_error_heldout_before"]
    repaired, plain = open_gguf(tmp_path / "repaired.gguf"), open_gguf(smollm2_pruned)
    assert [t.name for t in repaired.tensors] == [t.name for t in plain.tensors]
    for ours, theirs in zip(repaired.tensors, plain.tensors):
        if ours.name == "blk.11.ffn_down.weight":
            assert ours.qtype.name == "F32" and tensor_bytes(ours) != tensor_bytes(theirs)
        else:
            assert tensor_bytes(ours) == tensor_bytes(theirs) and ours.qtype == theirs.qtype, ours.name
    in_memory = prune_to(model=str(smollm2_gguf), out=str(tmp_path / "in-memory"), repair_policy="warn", **options)
    assert in_memory.provenance["repair"]["relative_error_after"] == pytest.approx(fit["relative_error_after"],
                                                                                   rel=1e-4)
    ids = random_ids()
    with torch.no_grad():
        ours = load_gguf(tmp_path / "repaired.gguf")(ids).logits
        reference = AutoModelForCausalLM.from_pretrained(tmp_path / "in-memory", dtype=torch.float32)(ids).logits
    assert torch.allclose(ours, reference, atol=2e-3, rtol=0), (ours - reference).abs().max()
    assert llama_cpp_greedy(tmp_path / "repaired.gguf").strip()  # llama.cpp loads the F32 tensor and generates


def smollm2_vocabulary(smollm2_gguf: Path) -> tuple[int, dict]:
    """SmolLM2's tokenizer metadata (key -> (value, type, item type)), for tiny GGUFs that llama.cpp
    can load: it refuses a model without a vocabulary its tokenizer understands."""
    source = open_gguf(smollm2_gguf)
    keys = {key: (source.value(key), field.types[0], field.types[-1] if len(field.types) > 1 else None)
            for key, field in source.fields.items() if key.startswith("tokenizer.ggml.")}
    return len(source.value("tokenizer.ggml.tokens")), keys


# Phi-3 is left out: llama.cpp's loader looks up tokens of Phi-3's own vocabulary, which SmolLM2's lacks.
LLAMA_CPP_CASES = [case for case in CASES if case[0] != "phi3"]


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore:config field 'max_window_layers'")
@pytest.mark.parametrize(("name", "qtype", "removed"), LLAMA_CPP_CASES,
                         ids=[f"{n}-{q.name}" for n, q, _ in LLAMA_CPP_CASES])
@pytest.mark.slow
def test_tiny_pruned_ggufs_of_several_architectures_run_in_llama_cpp(tmp_path, smollm2_gguf, name, qtype, removed):
    """llama.cpp itself reads each pruned file's block count, sliced per-layer arrays (Gemma's
    sliding-window pattern) and renumbered tensors, and generates; its greedy text survives a rewrite."""
    vocab_size, vocabulary = smollm2_vocabulary(smollm2_gguf)
    arch, layers = ARCHS[name][0], OVERRIDES.get(name, {}).get("num_hidden_layers", 6)
    period = {"gemma2": 2, "gemma3": 6}.get(name, 2)
    model = tiny_model(name, **{**OVERRIDES.get(name, {}), "vocab_size": vocab_size})
    source = write_tiny_gguf(model, tmp_path / f"{name}.gguf", qtype,
                             {**per_layer_keys(arch, layers, period), **vocabulary})
    pruned, rewritten = tmp_path / "pruned.gguf", tmp_path / "rewritten.gguf"
    prune_gguf(source, pruned, removed)
    assert open_gguf(pruned).block_count == layers - len(removed)
    assert llama_cpp_greedy(source, tokens=8)  # the tiny original loads: the pruned file is the thing tested
    text = llama_cpp_greedy(pruned, tokens=8)
    assert text
    prune_gguf(pruned, rewritten, [])
    assert llama_cpp_greedy(rewritten, tokens=8) == text



# --- structural checks (issue 38): every count bounded, tensors aligned and apart, layers whole -----


def _patched(source: Path, target: Path, anchor: bytes, skip: int, fmt: str, value) -> Path:
    """`source` with the value `skip` bytes after `anchor` (a key's or a tensor's name) overwritten."""
    import struct

    data = bytearray(source.read_bytes())
    at = data.index(anchor) + len(anchor) + skip
    struct.pack_into(fmt, data, at, value)
    target.write_bytes(bytes(data))
    return target


def test_a_metadata_array_claiming_more_items_than_the_file_holds_is_refused_at_once(tmp_path):
    source = tiny_gguf(tmp_path, "llama", Q.Q8_0, {"llama.mystery_table": ([1, 2, 3, 4], T.ARRAY, T.UINT32)})
    # after the key: its type (u32), the items' type (u32), the count (u64)
    bad = _patched(source, tmp_path / "huge.gguf", b"llama.mystery_table", 8, "<Q", 2**62)
    _expect_refusal(bad, tmp_path / "out.gguf", [1], r"the array llama.mystery_table claims 4,611,686,018,427,387,904 "
                                                     r"items of at least 4 bytes")


@pytest.mark.parametrize(("count", "match"), [
    (8, r"llama.block_count is 8 but layer\(s\) 6, 7 have no tensors"),
    (2**32 - 1, r"llama.block_count is 4,294,967,295 but layer\(s\) 6, 7, 8, 9, 10, 11, 12, 13, ... have no tensors")])
def test_a_block_count_beyond_the_layers_with_tensors_is_refused(tmp_path, count, match):
    source = tiny_gguf(tmp_path, "llama", Q.Q8_0)
    bad = _patched(source, tmp_path / "count.gguf", b"llama.block_count", 4, "<I", count)  # after its type (u32)
    _expect_refusal(bad, tmp_path / "out.gguf", [1], match)
    with pytest.raises(DepthcutError, match=match):
        open_gguf(bad)  # as analyze and the in-memory load read it


def test_a_missing_layer_or_a_missing_tensor_is_refused(tmp_path):
    out = tmp_path / "out.gguf"
    kinds = ["attn_norm.weight", "ffn_down.weight"]
    gap = _minimal_gguf(tmp_path / "gap.gguf", "llama", [f"blk.{i}.{k}" for i in (0, 1, 3) for k in kinds], layers=4)
    _expect_refusal(gap, out, [1], r"llama.block_count is 4 but layer\(s\) 2 have no tensors")
    names = [f"blk.{i}.{k}" for i in range(3) for k in kinds]
    names.remove("blk.1.ffn_down.weight")
    lacking = _minimal_gguf(tmp_path / "lacking.gguf", "llama", names, layers=3)
    _expect_refusal(lacking, out, [1], r"layer 1 lacks blk.1.ffn_down.weight, which layer 0 of the same kind has")
    # layers of different kinds (a hybrid's) are not a missing tensor
    hybrid = _minimal_gguf(tmp_path / "hybrid.gguf", "llama", ["blk.0.attn_q.weight", "blk.0.ffn_down.weight",
                                                               "blk.1.ssm_in.weight", "blk.1.ffn_down.weight"])
    assert open_gguf(hybrid).block_count == 2


def test_a_tensor_offset_off_the_alignment_is_refused_not_copied(tmp_path):
    import gguf as gguf_package

    source = tiny_gguf(tmp_path, "llama", Q.Q8_0)
    name = b"blk.2.ffn_down.weight"
    dims = len(gguf_package.GGUFReader(source).get_tensor(0).shape)  # every 2-D weight: 2 dimensions
    model = open_gguf(source)
    tensor = next(t for t in model.tensors if t.name == name.decode())
    relative = tensor.offset - int(model.readers[0].data_offset)
    assert dims >= 1 and len(tensor.shape) == 2
    # after the name: the dimension count (u32), the dimensions (u64 each), the type (u32), the offset (u64)
    bad = _patched(source, tmp_path / "shifted.gguf", name, 4 + 8 * 2 + 4, "<Q", relative + 1)
    _expect_refusal(bad, tmp_path / "out.gguf", [1], r"tensor 'blk.2.ffn_down.weight' starts at byte .* not on the "
                                                     r"file's 32-byte alignment")
