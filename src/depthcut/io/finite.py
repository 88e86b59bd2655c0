"""Whether stored weights are finite, checked as they are copied: a model with a NaN or an infinity
in a weight it keeps is refused, not pruned (one NaN in one weight made every measurement after its
layer NaN; copied, it makes the output as broken as its input, with exit 0).

Stored bytes are judged by their bits, not converted: a float is NaN or infinite exactly when all
its exponent bits are ones, in every IEEE format and in bfloat16. No torch: the GGUF and safetensors
copies read bytes, and a tensor in memory is asked through its own methods.
"""

from __future__ import annotations

import numpy as np

from depthcut.errors import DepthcutError

# float format -> (the unsigned integer of its width, the mask of its exponent bits)
EXPONENT_BITS = {
    "F64": (np.dtype("<u8"), 0x7FF0000000000000),
    "F32": (np.dtype("<u4"), 0x7F800000),
    "F16": (np.dtype("<u2"), 0x7C00),
    "BF16": (np.dtype("<u2"), 0x7F80),
}
# GGUF's plain float tensor types (GGMLQuantizationType) by the names above; quantized blocks are
# copied unchecked (their scales are a few bytes among many, checked where a tensor is dequantized)
GGUF_FLOATS = {0: "F32", 1: "F16", 30: "BF16", 28: "F64"}
REFUSAL = "depthcut does not prune a model whose weights are not finite (is the checkpoint damaged?)"


def non_finite(data, kind: str) -> int:
    """How many values of the float format `kind` (a key of EXPONENT_BITS) in the bytes `data` are
    NaN or infinite; 0 for a format not listed (integers, quantized blocks)."""
    if kind not in EXPONENT_BITS:
        return 0
    unsigned, mask = EXPONENT_BITS[kind]
    values = np.frombuffer(data, dtype=unsigned)
    return int(np.count_nonzero((values & unsigned.type(mask)) == mask))


def check_finite_bytes(data, kind: str, what: str) -> None:
    """Refuse the bytes `data` of the tensor `what` (its name, and where it is) if any value is NaN
    or infinite."""
    count = non_finite(data, kind)
    if count:
        raise DepthcutError(f"{what} holds {count:,} NaN or infinite value(s): {REFUSAL}")


def check_finite_tensors(tensors, where: str) -> None:
    """Refuse the first of the (name, tensor) pairs `tensors` (torch tensors) whose values are not all
    finite: one reduction per tensor, on the tensor's own device."""
    for name, tensor in tensors:
        if tensor.is_floating_point() and tensor.device.type != "meta" and not bool(tensor.isfinite().all()):
            count = int((~tensor.isfinite()).sum())
            raise DepthcutError(f"{name} of {where} holds {count:,} NaN or infinite value(s): {REFUSAL}")
