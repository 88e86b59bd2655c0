"""The healing recipe: every setting that decides the result, with the paper's defaults."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from depthcut.errors import DepthcutError

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
OBJECTIVES = ("lm", "kd", "kd+lm")


def _finite(value) -> bool:
    return value is None or (isinstance(value, int | float) and math.isfinite(value))


@dataclass(frozen=True)
class HealRecipe:
    """Defaults follow Gromov et al. 2024 (QLoRA on the MLP, rank 64, alpha = rank, dropout 0.05,
    AdamW, peak lr 3e-4, cosine decay, 100 warmup steps, batch 16 x 2048 tokens, 5000 steps).

    `objective`: "lm", the next-token loss; "kd", distillation from a teacher (the unpruned model):
    tau^2 * KL(teacher || student) at temperature `kd_temperature`; "kd+lm", `kd_weight` * KD +
    (1 - `kd_weight`) * LM."""

    rank: int = 64
    alpha: float | None = None  # None: alpha = rank
    dropout: float = 0.05
    targets: str = "mlp"
    lr: float = 3e-4
    warmup_steps: int = 100
    steps: int | None = None  # None: from `tokens`, else 5000
    tokens: int | None = None
    seq_len: int = 2048
    batch_size: int = 16
    grad_accum: int = 1
    weight_decay: float = 0.0
    seed: int = 0
    mixed_precision: str = "auto"  # auto: bf16 where the device computes it natively, else no
    gradient_checkpointing: bool = False
    quantize: str | None = None
    heldout_fraction: float = 0.05
    heldout_windows: int = 32
    objective: str = "lm"
    kd_temperature: float = 1.0
    kd_weight: float = 0.5  # the KD term's share of the kd+lm loss

    def __post_init__(self):
        problems = [f"--{f.name.replace('_', '-')} must be a finite number, got {getattr(self, f.name)}"
                    for f in fields(self) if "float" in str(f.type) and not _finite(getattr(self, f.name))]
        if problems:  # the ranges below would let inf through, and fail on nan
            raise DepthcutError("; ".join(problems))
        if self.rank < 1:
            problems.append(f"--rank must be at least 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            problems.append(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.lr <= 0:
            problems.append(f"--lr must be positive, got {self.lr}")
        for name in ("seq_len", "batch_size", "grad_accum", "heldout_windows"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            problems.append("--warmup-steps must be 0 or more")
        if self.steps is not None and self.tokens is not None:
            problems.append("give --steps or --tokens, not both")
        if (self.steps is not None and self.steps < 1) or (self.tokens is not None and self.tokens < 1):
            problems.append("--steps and --tokens must be at least 1")
        if self.mixed_precision not in MIXED_PRECISION:
            problems.append(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}")
        if self.quantize not in (None, "4bit"):
            problems.append(f"--quantize takes only 4bit, got {self.quantize!r}")
        if not 0 < self.heldout_fraction < 1:
            problems.append("--heldout-fraction must be between 0 and 1")
        if self.objective not in OBJECTIVES:
            problems.append(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if not self.kd_temperature > 0:
            problems.append(f"--kd-temperature must be positive, got {self.kd_temperature}")
        if not 0 <= self.kd_weight <= 1:
            problems.append(f"--kd-weight must be between 0 and 1, got {self.kd_weight}")
        if problems:
            raise DepthcutError("; ".join(problems))

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def tokens_per_step(self, world_size: int = 1) -> int:
        return self.seq_len * self.batch_size * self.grad_accum * world_size

    def total_steps(self, world_size: int = 1) -> int:
        if self.steps is not None:
            return self.steps
        if self.tokens is not None:
            return max(1, math.ceil(self.tokens / self.tokens_per_step(world_size)))
        return 5000

    @property
    def distils(self) -> bool:
        """Whether the loss has a distillation term (and so needs a teacher)."""
        return self.objective != "lm"

    def as_dict(self) -> dict:
        return asdict(self)

    def fingerprint(self) -> dict:
        """What a checkpoint must agree on: every field, less the distillation settings of a run
        that does not distil (they change nothing there; checkpoints from before they existed resume)."""
        fields = self.as_dict()
        if not self.distils:
            for name in ("objective", "kd_temperature", "kd_weight"):
                del fields[name]
        return fields
