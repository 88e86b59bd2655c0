"""Tiny random models of every supported architecture, built from configs (no hub)."""

from __future__ import annotations

import torch
import transformers as T

VOCAB = 96
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
_TOKENS = dict(bos_token_id=1, eos_token_id=2)
_ALTERNATING = ["sliding_attention", "full_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def _gemma3_vl():
    return T.Gemma3Config(
        text_config=dict(**_COMMON, head_dim=8, sliding_window=4, layer_types=_ALTERNATING),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=4),
        mm_tokens_per_image=4,
        **_TOKENS,
    )


# Each entry builds a config; sliding windows are shorter than the test sequences so that
# per-layer attention types really matter.
CONFIGS = {
    "llama": lambda: T.LlamaConfig(**_COMMON),
    "mistral": lambda: T.MistralConfig(**_COMMON, sliding_window=4),
    "qwen2": lambda: T.Qwen2Config(**_COMMON),
    "qwen3": lambda: T.Qwen3Config(**_COMMON, head_dim=8, layer_types=_ALTERNATING, sliding_window=4, use_sliding_window=True),
    "gemma2": lambda: T.Gemma2Config(**_COMMON, head_dim=8, sliding_window=4),
    "gemma3": lambda: T.Gemma3TextConfig(**_COMMON, head_dim=8, sliding_window=4, layer_types=_ALTERNATING),
    "phi3": lambda: T.Phi3Config(**_COMMON),
    "gpt2": lambda: T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=6, n_head=4, n_positions=128, **_TOKENS),
    "gpt_neox": lambda: T.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
        max_position_embeddings=128, **_TOKENS,
    ),
    "opt": lambda: T.OPTConfig(
        vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=6, num_attention_heads=4,
        max_position_embeddings=128, word_embed_proj_dim=32, pad_token_id=0, **_TOKENS,
    ),
    "falcon": lambda: T.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=6, num_attention_heads=4, **_TOKENS),
    "gemma3_vl": _gemma3_vl,
}


def tiny_model(name: str, seed: int = 0, device=None, **overrides):
    """A tiny random model of architecture `name` (on `device`, else the CPU); `overrides` set config
    attributes first. The weights are drawn on the CPU, so they are the same whatever the device."""
    torch.manual_seed(seed)
    config = CONFIGS[name]()
    for key, value in overrides.items():
        setattr(config, key, value)
    model = T.AutoModelForCausalLM.from_config(config)
    # Random init leaves tiny residual updates; scale weights up so layers differ measurably.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.mul_(4.0)
    if device is not None:
        model = model.to(device)
    return model.eval()


def tolerance(device, cpu: float, cuda: float) -> float:
    """The tolerance for comparing a result computed on `device` with a reference computed on the
    CPU: `cpu` when both ran there, `cuda` on a GPU (other kernels, other summation orders; TF32 is
    off in the test session, so float32 stays float32)."""
    return cpu if torch.device(device).type == "cpu" else cuda


def random_ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in memory, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:0]
    )
    corpus = ["the quick brown fox jumps over the lazy dog " * 3, "depth pruning removes layers from models"] * 20
    tokenizer.train_from_iterator(corpus, trainer)
    return T.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def padded_calibration(lengths, seed: int = 3):
    """Random token rows of unequal length, right-padded: padding must be left out of every sum, and
    the last token is the last non-pad one."""
    from depthcut.analysis.calibration import CalibrationSet

    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(3, VOCAB, (length,), generator=generator)
        mask[row, :length] = 1
    return CalibrationSet(ids, mask, "random", "documents", seed)
