"""A note that a heal without quantization would otherwise print, and no user can act on.

Wrapping a model with LoRA, peft imports bitsandbytes where it is installed. bitsandbytes' CPU backend
(on a CPU with AVX512-BF16) then fetches a hub kernel for its inference-only packed 4-bit path, which
depthcut never uses (see trainer.keep_4bit_differentiable), and with HF_HUB_OFFLINE set the `kernels`
package warns that it skips that kernel's publisher trust check. Only that one message is dropped, and
only while peft wraps or merges a model; `--quantize 4bit` imports bitsandbytes before, where it shows."""

from __future__ import annotations

import logging
from contextlib import contextmanager

UNUSED_KERNEL_REPO = "kernels-community/quantization-bitsandbytes"
KERNEL_LOOKUP_LOGGER = "kernels._internals.hf_hub"  # the `kernels` module that warns


class _WithoutText(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@contextmanager
def unused_kernel_lookup_quiet():
    """Drop `kernels`' messages about UNUSED_KERNEL_REPO while in the block; every other message stays."""
    lookup, unused = logging.getLogger(KERNEL_LOOKUP_LOGGER), _WithoutText(UNUSED_KERNEL_REPO)
    lookup.addFilter(unused)
    try:
        yield
    finally:
        lookup.removeFilter(unused)
