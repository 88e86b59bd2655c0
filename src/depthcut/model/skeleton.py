"""A model's skeleton: its modules built from its config alone, parameters on the meta device (no
weights), for what needs only its structure (layer names, parameter names) or fills the weights in
itself one layer at a time."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import NamedTuple

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoModelForCausalLM

from depthcut.errors import DepthcutError
from depthcut.io.config_checks import config_failure


class Skeleton(NamedTuple):
    model: torch.nn.Module
    config: object  # the transformers config as loaded from the folder (the model's own is a copy)
    dtype: torch.dtype  # the dtype of the (meta) parameters


def checkpoint_dtype(config) -> torch.dtype | None:
    """The dtype a config (a transformers config or its JSON as a dict) says the weights are saved in."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    # a transformers config reads an old `torch_dtype` as `dtype` (and warns when asked for the old name)
    value = get("dtype") or (get("torch_dtype") if isinstance(config, dict) else None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def meta_skeleton(folder: str | Path, dtype: torch.dtype | None = None, device: torch.device | None = None,
                  trust_remote_code: bool = False) -> Skeleton:
    """The model of the checkpoint in `folder` without weights, in eval mode: parameters on the meta
    device in `dtype` (by default the dtype the checkpoint is saved in, else float32); buffers
    (rotary frequencies, ...) computed for real, on the CPU or put on `device`. The config returned
    is the folder's as it is: the model is built from a copy, which `from_config` changes (the dtype)."""

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        return skeleton_of(config, dtype, device, trust_remote_code)
    except (OSError, ValueError, KeyError, StrictDataclassError) as error:  # a config.json transformers refuses
        raise DepthcutError(config_failure(folder, error)) from None


def skeleton_of(config, dtype: torch.dtype | None = None, device: torch.device | None = None,
                trust_remote_code: bool = False) -> Skeleton:
    """The weightless model of `config` (see `meta_skeleton`), whatever file the config came from."""

    # deferred: accelerate is imported only where processes or empty weights need it
    from accelerate import init_empty_weights

    dtype = dtype or checkpoint_dtype(config) or torch.float32
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(copy.deepcopy(config), trust_remote_code=trust_remote_code,
                                                     dtype=dtype)
    except ValueError as error:  # a config class transformers builds no causal LM from
        raise DepthcutError(f"cannot build the model of this config without its weights: "
                            f"{str(error).splitlines()[0][:200] if str(error) else type(error).__name__}") from None
    if device is not None:
        for module in model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = buffer.to(device)
    return Skeleton(model.eval(), config, dtype)
