"""Tiny random models of every architecture in transformers' causal-LM mapping, built from each
config class's defaults with the sizes shrunk (no hub): what the generated architecture tests and
docs/architectures.md run on. `build_tiny(name)` returns the model or raises `NotTiny` with the
reason it cannot be built small on a CPU; `check_cut` prunes a saved copy as `depthcut prune` does
and compares it with the original run with the removed layers bypassed.

    python tests/architectures.py [TABLE.md]   # the counts (and table) of tests/architecture_outcomes.json
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

VOCAB = 96
NUM_LAYERS = 8
MAX_PARAMETERS = 3_000_000

# Every size field a config class may have, set small where the class has it.
SIZES = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=128, moe_intermediate_size=16,
    shared_expert_intermediate_size=32, num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2,
    moe_num_experts=4, moe_k=2, kv_lora_rank=8, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
    n_group=1, topk_group=1, ffn_dim=64, n_embd=32, n_layer=NUM_LAYERS, n_head=4, n_positions=128, d_model=32,
    mamba_d_state=8, mamba_n_heads=4, mamba_d_head=16, ssm_state_size=8, mamba_num_heads=4, mamba_head_dim=16,
    mamba_dt_rank=4, n_groups=1, mamba_n_groups=1, state_size=8, time_step_rank=4, chunk_size=16, mamba_chunk_size=16,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
    intermediate_size_mlp=64, hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB, laurel_rank=4,
    sliding_window=4, attention_chunk_size=4, n_shared_experts=1, expert_intermediate_size=16,
    moe_shared_expert_intermediate_size=16, num_heads=4, decoder_layers=NUM_LAYERS, decoder_attention_heads=4,
    decoder_ffn_dim=64, encoder_layers=NUM_LAYERS, encoder_attention_heads=4, encoder_ffn_dim=64, rotary_dim=4,
    n_inner=64, d_ff=64, num_kv_heads=2, embed_dim=32, conv_dim=32, conv_L_cache=3, block_dim=32, block_ff_dim=64,
    mlp_hidden_size=64, d_inner=64, dim=32, n_heads=4, hidden_dim=64, word_embed_proj_dim=32, projection_dim=32,
    shared_expert_hidden_size=32, expert_hidden_size=16, num_shared_experts=1, moe_num_shared_experts=1,
    index_head_dim=8, index_n_heads=2, index_topk=64, num_layers=NUM_LAYERS, n_layers=NUM_LAYERS, pad_token_id=0, bos_token_id=1,
    eos_token_id=2,
)
# Settings that differ from the defaults so that every kind of layer appears in 8 layers (and
# multi-head latent attention gets as many key/value heads as heads).
PATTERNS = {
    "qwen2_moe": dict(decoder_sparse_step=2),
    "qwen3_moe": dict(decoder_sparse_step=2),
    "deepseek_v2": dict(first_k_dense_replace=1, num_key_value_heads=4),
    "deepseek_v3": dict(first_k_dense_replace=1, num_key_value_heads=4),
    "deepseek_v32": dict(first_k_dense_replace=1, num_key_value_heads=4),
    "glm4_moe": dict(first_k_dense_replace=1),
    "glm4_moe_lite": dict(first_k_dense_replace=1, num_key_value_heads=4),
    "glm_moe_dsa": dict(first_k_dense_replace=1, num_key_value_heads=4),
    "minicpm3": dict(num_key_value_heads=4),
    "axk1": dict(num_key_value_heads=4),
    "axk2": dict(num_key_value_heads=4),
    "ernie4_5_moe": dict(moe_layer_start_index=1, moe_layer_end_index=6),
    "llama4_text": dict(interleave_moe_layer_step=2, no_rope_layer_interval=2, moe_layers=None, no_rope_layers=None),
    "jamba": dict(attn_layer_period=4, attn_layer_offset=2, expert_layer_period=2, expert_layer_offset=1),
    "bamba": dict(attn_layer_indices=[2, 5]),
    "nemotron_h": dict(hybrid_override_pattern="M*M-M*M-", num_hidden_layers=None),
    "gpt_neo": dict(attention_types=[[["global", "local"], NUM_LAYERS // 2]]),
    "mamba2": dict(num_heads=8, head_dim=8),
    "falcon_h1": dict(mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16),
    "gemma3n_text": dict(intermediate_size=[64] * NUM_LAYERS, num_kv_shared_layers=2,
                         activation_sparsity_pattern=[0.0] * NUM_LAYERS),
    # multi-head latent attention: as many key/value heads as heads
    "sarvam_mla": dict(num_key_value_heads=4),
    "bailing_hybrid": dict(num_key_value_heads=4, num_expert_group=1, num_experts_per_token=2),
    "xmod": dict(default_language="en_XX"),  # its adapters are chosen by language; the model has one
    "youtu": dict(num_key_value_heads=4),
    # sizes under names of their own
    "ctrl": dict(dff=64),
    "cpmant": dict(dim_ff=64, dim_head=8),
    # the per-layer lists are sized for the default depth and not derived again
    "zamba2": dict(layers_block_type=["linear_attention", "linear_attention", "hybrid", "linear_attention",
                                      "linear_attention", "hybrid", "linear_attention", "linear_attention"]),
    "lfm2_moe": dict(num_dense_layers=1, layer_types=["conv", "conv", "full_attention", "conv", "conv",
                                                      "full_attention", "conv", "conv"]),
    # transformers' DbrxAttentionConfig has neither rope_theta nor a usable clip_qkv default, which the model reads
    "dbrx": dict(attn_config=dict(rope_theta=10000.0, kv_n_heads=2, clip_qkv=8.0), ffn_config=dict(ffn_hidden_size=64)),
}
_SLIDING, _FULL = "sliding_attention", "full_attention"
# Gemma 4's full-attention layers have a head size of their own (per_layer_config, by layer index):
# the default names layers 5, 11, ... of 30; here the full layers of 8 (the last is always full).
_GEMMA4_TEXT = dict(layer_types=[_SLIDING] * 5 + [_FULL, _SLIDING, _FULL],
                    per_layer_config={"5": {"head_dim": 16}, "7": {"head_dim": 16}})
# Settings of a multimodal model's text_config, by the model's name.
TEXT_PATTERNS = {
    "gemma3n": PATTERNS["gemma3n_text"],
    "gemma4": _GEMMA4_TEXT,
    "gemma4_unified": _GEMMA4_TEXT,
}
# Encoders with a language-model head: a causal LM only as a decoder (otherwise they attend both ways).
AS_DECODER = {"bert", "bert-generation", "big_bird", "camembert", "data2vec-text", "electra", "ernie", "megatron-bert",
              "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "roformer", "xlm-roberta", "xlm-roberta-xl",
              "xmod"}


class NotTiny(Exception):
    """The architecture cannot be built small on a CPU; the message says why."""


def _shrunk(defaults: dict, sub_config: bool = False) -> dict:
    settings = {k: v for k, v in SIZES.items() if k in defaults}
    # per-layer lists sized for the default depth are derived again for the tiny one
    depth = defaults.get("num_hidden_layers")
    settings.update({k: None for k, v in defaults.items() if isinstance(v, list) and depth and len(v) == depth
                     and depth != NUM_LAYERS and "num_hidden_layers" in settings})
    if sub_config:  # a vision or audio tower: two small layers
        settings.update({k: 2 for k in ("num_hidden_layers", "depth", "num_layers") if k in defaults})
        settings.update({k: 16 for k in ("image_size",) if k in defaults})
        settings.update({k: 4 for k in ("patch_size",) if k in defaults})
    for key, value in defaults.items():
        if isinstance(value, dict) and key.endswith("_config") and "model_type" in value:
            settings[key] = {**value, **_shrunk(value, sub_config=key != "text_config")}
    return settings


def tiny_config(name: str):
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[name]
    settings = _shrunk(cls().to_dict())
    for key, value in PATTERNS.get(name, {}).items():  # a sub-config's settings join its shrunk ones
        settings[key] = {**settings[key], **value} if isinstance(settings.get(key), dict) else value
    if name in TEXT_PATTERNS:
        settings["text_config"] = {**settings["text_config"], **TEXT_PATTERNS[name]}
    if name in AS_DECODER:
        settings["is_decoder"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(**settings)


def reason_of(error: Exception) -> str:
    text = next((line.strip() for line in str(error).splitlines() if line.strip()), "")[:160]
    return f"{type(error).__name__}: {text}"


def build_tiny(name: str, seed: int = 0):
    """A tiny random model of `name` in eval mode, weights scaled up so that layers differ measurably."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        config = tiny_config(name)
        with init_empty_weights():
            meta = AutoModelForCausalLM.from_config(config)
    except Exception as error:  # noqa: BLE001 (the reason goes into the list of untested architectures)
        raise NotTiny(reason_of(error)) from None
    count = sum(p.numel() for p in meta.parameters())
    if count > MAX_PARAMETERS:
        biggest = max(meta.named_parameters(), key=lambda item: item[1].numel())[0]
        raise NotTiny(f"{count:,} parameters with every size field shrunk (largest: {biggest})")
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config).eval()
    except Exception as error:  # noqa: BLE001
        raise NotTiny(reason_of(error)) from None
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.mul_(4.0)
    return model


# Cuts every architecture is tried at (layers of 8): the first layer, one inside a period, a pair
# crossing a period of 2, the last but one, and a block of 4 (a whole period of 2 or 4).
CUTS = {"first": "0", "middle": "3", "pair": "4:6", "last_but_one": f"{NUM_LAYERS - 2}", "block": "2:6"}


def random_ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


@torch.no_grad()
def bypassed_logits(model, removed: list[int], ids: torch.Tensor) -> torch.Tensor:
    """The reference: the original model with the removed layers returning their input unchanged."""
    from depthcut.model.layers import find_layer_stack, first_tensor

    def identity(module, args, kwargs, output):
        hidden = first_tensor(args, kwargs)
        # a tuple, a list (OpenAI GPT) or the tensor itself, as the layer returns it
        return type(output)([hidden, *output[1:]]) if isinstance(output, (tuple, list)) else hidden

    stack = find_layer_stack(model)
    handles = [stack.layers[i].register_forward_hook(identity, with_kwargs=True) for i in removed]
    try:
        return model(input_ids=ids, use_cache=False).logits.float()
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def cached_generation_matches(model) -> bool | None:
    """Whether greedy generation with the KV cache equals generation without it (None: the model
    cannot generate with a cache on this machine at all)."""
    ids = random_ids(batch=1, length=6, seed=5)
    try:
        settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
        cached = model.generate(ids, use_cache=True, **settings)
        uncached = model.generate(ids, use_cache=False, **settings)
    except Exception:  # noqa: BLE001 (the original is asked the same; only a change counts)
        return None
    return torch.equal(cached, uncached)


def saved_folder(name: str, model, tokenizer, root) -> Path:
    folder = Path(root) / f"{name}-source"
    if not folder.is_dir():
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def check_cut(model, folder, spec: str, out, stream: bool, original_generates: bool | None = None) -> str:
    """Prune the saved `folder` at `spec` (--layers) into `out` as `depthcut prune` does, and check the
    result against the original `model` with those layers bypassed: 'exact', or 'refused: REASON'
    (one line, nothing written). Fails (AssertionError) on a model that differs."""
    from transformers import AutoModelForCausalLM

    from depthcut.errors import DepthcutError
    from depthcut.model.layers import find_layer_stack
    from depthcut.model.surgery import parse_layer_spec
    from depthcut.pipeline.prune import prune_to

    removed = parse_layer_spec(spec, NUM_LAYERS)
    try:
        prune_to(model=str(folder), layers=spec, out=str(out), stream=stream, quiet=True)
    except DepthcutError as error:
        message = str(error)
        assert "\n" not in message, message
        assert not Path(out).exists(), f"a refused cut wrote {out}"
        return f"refused: {message}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    reloaded.eval()
    assert not info["missing_keys"], f"randomly initialised after reload: {sorted(info['missing_keys'])[:4]}"
    assert not info["unexpected_keys"], f"unused weights: {sorted(info['unexpected_keys'])[:4]}"
    layers = len(find_layer_stack(reloaded))
    assert layers == NUM_LAYERS - len(removed), f"{layers} layers after the cut"
    ids = random_ids()
    expected = bypassed_logits(model, removed, ids)
    with torch.no_grad():
        actual = reloaded(input_ids=ids, use_cache=False).logits.float()
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    if original_generates is None:
        original_generates = cached_generation_matches(model)
    if original_generates:
        assert cached_generation_matches(reloaded), "cached generation differs from uncached after the cut"
    return "exact"


def summary_of(entry: dict) -> str:
    """One architecture's outcome in the snapshot: exact (at every cut, in memory), refused (at every
    cut), exact or refused, or not buildable."""
    if entry.get("build") != "ok":
        return "not buildable"
    outcomes = list(entry.get("memory", {}).values())
    exact = sum(outcome == "exact" for outcome in outcomes)
    return "exact" if exact == len(outcomes) else "refused" if not exact else "exact or refused"


def table(snapshot: dict) -> list[str]:
    """The snapshot as docs/architectures.md's table: architecture, outcome, the exact cuts and a refusal."""
    lines = ["| architecture | cuts | what happened at `--layers` " + ", ".join(f"`{s}`" for s in CUTS.values()) + " |",
             "|---|---|---|"]
    for name, entry in snapshot.items():
        if entry["outcome"] == "not buildable":
            detail = entry["build"].removeprefix("not buildable: ")
        else:
            outcomes = entry["memory"]
            exact = [f"`{CUTS[cut]}`" for cut, outcome in outcomes.items() if outcome == "exact"]
            refused = sorted({o.removeprefix("refused: ") for o in outcomes.values() if o != "exact"})
            detail = "; ".join(filter(None, [f"exact: {', '.join(exact)}" if exact else "",
                                             f"refused: {refused[0][:200]}" if refused else ""]))
        lines.append(f"| {name} | {entry['outcome']} | {detail.replace('|', '/')} |")
    return lines


if __name__ == "__main__":
    import collections
    import json
    import sys

    snapshot = json.loads(Path(__file__).with_name("architecture_outcomes.json").read_text())
    counts = collections.Counter(entry["outcome"] for entry in snapshot.values())
    print(f"{len(snapshot)} architectures: " + ", ".join(f"{n} {outcome}" for outcome, n in counts.most_common()))
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text("\n".join(table(snapshot)) + "\n")
