"""Which floating-point type to compute in: the one the hardware runs natively and fast.

bfloat16 halves memory traffic, but only some processors compute it natively. On a CPU with
AVX512-BF16 or AMX a bf16 matrix product runs about 2.4x faster than float32; on an AVX2-only
CPU bf16 is emulated and about 5x *slower*. So `auto` reads the capability instead of assuming:

- CUDA: bfloat16 where the GPU supports it (Ampere and newer), else float16 for checkpoints stored
  in float16 (trained to fit its range), else float32.
- CPU: bfloat16 when ATen's vector capability is AVX512 (or better) *and* the processor has
  AVX512-BF16 or AMX-BF16 *and* oneDNN/MKL are not capped below them (`ONEDNN_MAX_CPU_ISA`,
  `MKL_ENABLE_INSTRUCTIONS`, `ATEN_CPU_CAPABILITY`, as users set them to pin a slower ISA); where
  the processor's flags cannot be read, a tiny bf16 product is timed against float32 once.
- `checkpoint` keeps the dtype the weights were stored in.

Reductions (distances, losses, log-likelihood sums) are float32/float64 whatever is chosen here.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from depthcut.errors import DepthcutError

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
CHOICES = ("auto", "checkpoint", "float32", "bfloat16", "float16")
# oneDNN ISA caps below which bf16 has no native instructions.
_ONEDNN_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI"}
_MKL_WITHOUT_BF16 = {"SSE4_2", "AVX", "AVX2", "AVX512", "AVX512_E1"}


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype to load and compute in (`None`: the checkpoint's own), and why."""

    asked: str
    dtype: torch.dtype | None
    reason: str

    @property
    def name(self) -> str:
        return "checkpoint" if self.dtype is None else str(self.dtype).removeprefix("torch.")

    def as_dict(self) -> dict:
        return {"asked": self.asked, "dtype": self.name, "reason": self.reason}

    @classmethod
    def from_dict(cls, facts: dict) -> DtypeChoice:
        dtype = None if facts["dtype"] == "checkpoint" else getattr(torch, facts["dtype"])
        return cls(facts["asked"], dtype, facts["reason"])

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})"


def _cpu_flags() -> set[str] | None:
    """The processor's feature flags from /proc/cpuinfo (Linux), or None where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return None


@functools.lru_cache(maxsize=1)
def _bf16_product_is_faster() -> bool:
    """Time a 256x512 @ 512x512 product in bf16 and float32 (a few ms, once per process)."""
    a32, b32 = torch.randn(256, 512), torch.randn(512, 512)
    a16, b16 = a32.bfloat16(), b32.bfloat16()

    def best(a, b) -> float:
        a @ b  # warm-up: the first call picks kernels
        times = []
        for _ in range(5):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return min(times)

    return best(a16, b16) < 0.8 * best(a32, b32)


def cpu_bf16_support() -> tuple[bool, str]:
    """(native, reason): whether this CPU computes bfloat16 natively, honouring the ISA caps in the environment."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX512", "SVE256", "SVE", "AVX512_BF16"):
        return False, f"CPU capability {capability}: bfloat16 would be emulated"
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if onednn in _ONEDNN_WITHOUT_BF16:
        return False, f"ONEDNN_MAX_CPU_ISA={onednn} caps oneDNN below native bfloat16"
    mkl = os.environ.get("MKL_ENABLE_INSTRUCTIONS", "").upper()
    if mkl in _MKL_WITHOUT_BF16:
        return False, f"MKL_ENABLE_INSTRUCTIONS={mkl} caps MKL below native bfloat16"
    flags = _cpu_flags()
    if flags is not None and capability == "AVX512":
        native = sorted(flags & {"avx512_bf16", "amx_bf16"})
        if native:
            return True, f"CPU capability {capability} with {'/'.join(native)}: bfloat16 is native"
        return False, f"CPU capability {capability} without avx512_bf16 or amx_bf16: bfloat16 would be emulated"
    if _bf16_product_is_faster():
        return True, f"CPU capability {capability}: a timed bfloat16 product beat float32"
    return False, f"CPU capability {capability}: a timed bfloat16 product was not faster than float32"


def _auto(device: torch.device, checkpoint_dtype: torch.dtype | None) -> tuple[torch.dtype, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, f"{name} computes bfloat16 natively"
        if checkpoint_dtype == torch.float16:
            return torch.float16, f"{name} has no bfloat16; the checkpoint is stored in float16"
        return torch.float32, f"{name} has no bfloat16, and float16 could overflow for this checkpoint"
    if device.type == "cpu":
        native, reason = cpu_bf16_support()
        return (torch.bfloat16 if native else torch.float32), reason
    return torch.float32, f"no bfloat16 check for {device.type} devices"


def choose_dtype(asked: str | torch.dtype | None = "auto", device: str | torch.device = "cpu",
                 checkpoint_dtype: torch.dtype | None = None) -> DtypeChoice:
    """Turn a --dtype value into a `DtypeChoice` for `device`; `None` means auto."""
    if isinstance(asked, torch.dtype):
        return DtypeChoice(str(asked).removeprefix("torch."), asked, "asked for")
    asked = "auto" if asked is None else asked
    if asked == "checkpoint":
        return DtypeChoice(asked, None, "the checkpoint's own dtype, as asked")
    if asked == "auto":
        dtype, reason = _auto(torch.device(device), checkpoint_dtype)
        return DtypeChoice(asked, dtype, f"auto: {reason}")
    try:
        return DtypeChoice(asked, DTYPES[asked], "asked for")
    except KeyError:
        raise DepthcutError(f"unknown dtype {asked!r}; use {', '.join(CHOICES)}") from None


def autocast_for(device: str | torch.device = "cpu") -> tuple[str, str]:
    """(mixed_precision, reason) for healing's `--mixed-precision auto`: bf16 where it is native, else no."""
    device = torch.device(device)
    dtype, reason = _auto(device, None)
    return ("bf16" if dtype == torch.bfloat16 else "no"), reason


_announced: set[str] = set()


def announce(choice: DtypeChoice) -> None:
    """Log the choice once per process (every output's metadata records it too)."""
    text = f"dtype: {choice}"
    if text not in _announced:
        _announced.add(text)
        log.info(text)
