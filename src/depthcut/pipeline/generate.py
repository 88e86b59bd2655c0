"""`generate`: greedy completions of prompts, to compare models by eye (`depthcut generate`)."""

from __future__ import annotations

import torch

from depthcut.errors import DepthcutError
from depthcut.pipeline.common import check_positive, load
from depthcut.pipeline.configs import GenerateConfig
from depthcut.pipeline.options import make_config


def complete(model, tokenizer, prompt: str, max_new_tokens: int = 40, chat: bool = False) -> str:
    """The greedy completion of `prompt` (inside the chat template when `chat` and the model has one)."""

    text = prompt
    if chat and tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=not chat).to(model.device)
    if inputs["input_ids"].shape[1] == 0:
        raise DepthcutError(f"the prompt {prompt!r} is no tokens for this tokenizer: give some text to continue")
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def generate(config: GenerateConfig | None = None, /, **fields) -> dict[str, str]:
    """Load a model and complete each prompt greedily: {prompt: completion}."""
    config = make_config(GenerateConfig, config, fields)
    check_positive(max_new_tokens=config.max_new_tokens)
    if not all(config.prompt):
        raise DepthcutError("a prompt is empty: give some text to continue")
    model, tokenizer, _ = load(config)
    return {prompt: complete(model, tokenizer, prompt, config.max_new_tokens, config.chat) for prompt in config.prompt}
