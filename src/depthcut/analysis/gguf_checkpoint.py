"""A GGUF model for the layer-streamed analysis (`depthcut.analysis.streamed`): a weightless skeleton built
from the GGUF's config, and a reader that hands out one tensor at a time, dequantized and named as
the Hugging Face model's parameter, exactly as transformers' GGUF loader makes it.

The names and the per-architecture reshuffles (the Q/K permutation llama.cpp's converter applies to
Llama, Gemma's norm offset, ...) are transformers' own (`transformers.modeling_gguf_pytorch_utils`):
`get_gguf_hf_weights_map` and the architecture's `TensorProcessor`, applied tensor by tensor, so
the streamed weights equal those of `from_pretrained(folder, gguf_file=...)`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig
from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

from depthcut.errors import DepthcutError
from depthcut.io.finite import check_finite_tensors
from depthcut.io.gguf_files import gguf_module, open_gguf, read_bytes
from depthcut.model.skeleton import Skeleton, skeleton_of

# Processors that build one parameter out of several GGUF tensors (or several out of one): those
# tensors cannot be handed out one at a time.
_FUSING = ("Qwen2MoeTensorProcessor", "GptOssTensorProcessor", "MiniMaxM2TensorProcessor")


def gguf_config(path: str | Path, trust_remote_code: bool = False):
    """The transformers config of the GGUF model at `path`, as `from_pretrained(..., gguf_file=)` makes it,
    after the checks every GGUF path shares (`open_gguf`): transformers' reader trusts every count."""
    path = Path(path)
    open_gguf(path)
    try:
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=trust_remote_code)
    except ValueError as error:  # an architecture transformers cannot load from GGUF
        raise DepthcutError(f"transformers cannot read {path}: {str(error).splitlines()[0]}") from None


def gguf_skeleton(path: str | Path, dtype: torch.dtype | None = None, device: torch.device | None = None,
                  trust_remote_code: bool = False) -> Skeleton:
    """`depthcut.model.skeleton.meta_skeleton` for a GGUF file: the model without weights, in eval mode."""

    return skeleton_of(gguf_config(path, trust_remote_code), dtype, device, trust_remote_code)


class GGUFCheckpointReader:
    """Tensors of a GGUF model by name, dequantized one at a time: the interface of
    `depthcut.analysis.checkpoint.CheckpointReader` (`key_for`, `get`, `folder`, `converted`)."""

    def __init__(self, path: str | Path, model):
        self.folder = Path(path)  # named as CheckpointReader's, for the messages that show it
        self.gguf = open_gguf(path)
        self.gguf.drop_metadata()  # the skeleton has the config: only the tensors are read from here on
        self.tensors = {tensor.name: tensor for tensor in self.gguf.tensors}
        processor_class = TENSOR_PROCESSORS.get(self.gguf.architecture, TensorProcessor)
        self.processor = processor_class(config=model.config.to_dict())  # the head counts the processors read
        mapping = get_gguf_hf_weights_map(model, self.processor)  # GGUF name -> parameter name
        fused = type(self.processor).__name__ in _FUSING
        self.converted = {name for name in self.tensors if fused and ("_exps" in name or "_projs" in name)}
        self.keys = {hf: name for name, hf in mapping.items() if name in self.tensors and name not in self.converted}

    def key_for(self, name: str) -> str | None:
        """The GGUF tensor name of the model parameter `name`."""
        return self.keys.get(name)

    def get(self, key: str, pin: bool = False) -> torch.Tensor:
        """The tensor `key` dequantized to float32 (as transformers does), in page-locked memory with `pin`."""
        gguf = gguf_module()
        tensor = self.tensors[key]
        weights = gguf.quants.dequantize(read_bytes(tensor), tensor.qtype)
        result = self.processor.process(weights=weights, name=key, tensor_key_mapping={}, parsed_parameters={})
        if result.name is None:
            raise DepthcutError(f"tensor {key} of {self.folder} is converted on load in a way streaming cannot follow")
        values = torch.from_numpy(np.ascontiguousarray(result.weights))
        check_finite_tensors([(key, values)], str(tensor.path))  # dequantized: a block's scale counts too
        if pin:
            values = torch.empty(values.shape, dtype=values.dtype, pin_memory=True).copy_(values)
        return values
