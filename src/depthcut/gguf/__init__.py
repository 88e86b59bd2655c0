"""GGUF in, GGUF out: depth pruning of llama.cpp models without touching their quantization.

- `depthcut.gguf.files`: a GGUF model (one file or a split) opened and checked; tensor bytes
  copied or read one tensor at a time.
- `depthcut.gguf.layers`: what removing layers changes in the metadata (per-layer arrays sliced,
  layer counts recounted, index-derived layer kinds checked), or why it cannot be done.
- `depthcut.gguf.prune`: `prune_gguf` writes the pruned model, kept tensors byte for byte.
- `depthcut.gguf.stream`: a weightless skeleton and a dequantizing reader for the layer-streamed analysis.

See docs/gguf.md.
"""

from depthcut.gguf.files import GGUFModel, is_gguf_file, open_gguf
from depthcut.gguf.layers import LayerPlan, plan_removal
from depthcut.gguf.prune import gguf_block_count, prune_gguf, prune_gguf_to

__all__ = ["GGUFModel", "LayerPlan", "gguf_block_count", "is_gguf_file", "open_gguf", "plan_removal", "prune_gguf",
           "prune_gguf_to"]
