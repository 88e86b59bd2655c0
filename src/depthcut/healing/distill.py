"""Knowledge distillation from the unpruned model (Hinton et al. 2015; Minitron, LinearPatch).

The loss is KL(teacher || student) of the next-token distributions at temperature tau, times tau^2
(so that its gradients keep their scale as tau changes), averaged over the non-padding positions:

    KD = tau^2 / N * sum_i sum_v p_t(v | i) * (log p_t(v | i) - log p_s(v | i)),   p = softmax(logits / tau)

It is computed in float32 (float64 for float64 logits) a chunk of positions at a time, with a
hand-written backward, d KD / d s_i = tau / N * (p_s(i) - p_t(i)): the only tensors kept for the
backward are the logits themselves, never a float32 (batch, seq, vocab) copy of them.
"""

from __future__ import annotations

import torch

from depthcut.errors import DepthcutError
from depthcut.evaluation.metrics import mean_stderr
from depthcut.model.layers import text_config

CHUNK_ELEMENTS = 1 << 24  # float32 elements per chunk and temporary: 64 MiB


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.promote_types(logits.dtype, torch.float32)


def _chunks(rows: int, vocab: int, chunk_rows: int | None):
    step = chunk_rows or max(1, CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def token_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
             chunk_rows: int | None = None) -> torch.Tensor:
    """tau^2 * KL(teacher || student) at every position of (N, V) logits: a float32 (N,) tensor
    (float64 for float64 logits). No gradient: see `distillation_loss` for the differentiable mean."""
    dtype = _compute_dtype(student)
    out = torch.empty(student.shape[0], dtype=dtype, device=student.device)
    with torch.no_grad():
        for rows in _chunks(student.shape[0], student.shape[-1], chunk_rows):
            log_s = (student[rows].to(dtype) / temperature).log_softmax(-1)  # (n, V)
            log_t = (teacher[rows].to(dtype) / temperature).log_softmax(-1)
            out[rows] = (log_t.exp() * (log_t - log_s)).sum(-1) * temperature**2
    return out


class _DistillationLoss(torch.autograd.Function):
    """sum_i weights_i * token_kl_i, differentiable in the student's logits, chunked both ways."""

    @staticmethod
    def forward(ctx, student, teacher, weights, temperature, chunk_rows):
        ctx.save_for_backward(student, teacher, weights)
        ctx.temperature, ctx.chunk_rows = temperature, chunk_rows
        return (token_kl(student, teacher, temperature, chunk_rows) * weights).sum()

    @staticmethod
    def backward(ctx, grad_output):
        student, teacher, weights = ctx.saved_tensors
        tau, dtype = ctx.temperature, _compute_dtype(student)
        grad = torch.empty_like(student)
        for rows in _chunks(student.shape[0], student.shape[-1], ctx.chunk_rows):
            p_s = (student[rows].to(dtype) / tau).softmax(-1)  # (n, V)
            p_t = (teacher[rows].to(dtype) / tau).softmax(-1)
            grad[rows] = ((p_s - p_t) * (weights[rows, None] * (tau * grad_output))).to(grad.dtype)
        return grad, None, None, None, None


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      attention_mask: torch.Tensor | None = None, temperature: float = 1.0,
                      chunk_rows: int | None = None) -> torch.Tensor:
    """tau^2 * KL(teacher || student) of the next-token distributions, averaged over the positions
    where `attention_mask` is 1 (every position without one): a float32 scalar with a gradient for
    `student_logits` (B, T, V), whatever their dtype (bf16 logits are upcast a chunk at a time)."""
    if student_logits.shape != teacher_logits.shape:
        raise DepthcutError(f"the teacher's logits have shape {tuple(teacher_logits.shape)}, the student's "
                            f"{tuple(student_logits.shape)}: distillation needs the same tokenizer and vocabulary")
    vocab = student_logits.shape[-1]
    student, teacher = student_logits.reshape(-1, vocab), teacher_logits.detach().reshape(-1, vocab)  # (B*T, V)
    dtype = _compute_dtype(student)
    if attention_mask is None:
        weights = torch.full((student.shape[0],), 1.0 / max(student.shape[0], 1), dtype=dtype, device=student.device)
    else:
        valid = attention_mask.reshape(-1).to(device=student.device, dtype=dtype)
        weights = valid / valid.sum().clamp(min=1)
    return _DistillationLoss.apply(student, teacher, weights, float(temperature), chunk_rows)


def vocab_size(model) -> int | None:
    """The width of `model`'s next-token logits (its output layer's, a 4-bit one's too)."""

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "out_features", None):
        return int(head.out_features)
    return getattr(text_config(model), "vocab_size", None)


def check_teacher(student, teacher) -> None:
    """Refuse a teacher whose logits do not line up with the student's; freeze it for the run."""
    theirs, ours = vocab_size(teacher), vocab_size(student)
    if theirs != ours:
        raise DepthcutError(f"the teacher's vocabulary has {theirs} tokens, the student's {ours}: distillation "
                            "needs the unpruned model the student was cut from (the same tokenizer)")
    teacher.eval()
    teacher.requires_grad_(False)


def teacher_description(teacher) -> dict:
    """What a resumed run checks about its teacher (it is reloaded, never checkpointed)."""

    config = text_config(teacher)
    return {"model_type": getattr(config, "model_type", None), "layers": getattr(config, "num_hidden_layers", None),
            "vocab": vocab_size(teacher), "parameters": sum(p.numel() for p in teacher.parameters())}


@torch.no_grad()
def teacher_logits(teacher, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The teacher's logits for `input_ids`, on their device. `no_grad`, not `inference_mode`: the
    distillation loss keeps them for its backward, which an inference tensor cannot be."""
    device = teacher.get_input_embeddings().weight.device
    mask = None if attention_mask is None else attention_mask.to(device)
    return teacher(input_ids=input_ids.to(device), attention_mask=mask, use_cache=False).logits.to(input_ids.device)


@torch.inference_mode()
def heldout_kl(student, teacher, windows, temperature: float = 1.0, batch_size: int = 8) -> dict:
    """The distillation loss on held-out `windows` (a CalibrationSet): tau^2 * KL(teacher || student)
    averaged over their non-padding positions, summed in float64, and its standard error over windows."""
    device = next(student.parameters()).device
    total, count, window_kls = 0.0, 0, []
    for input_ids, attention_mask in windows.batches(batch_size):
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        ours = student(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (B, T, V)
        theirs = teacher_logits(teacher, input_ids, attention_mask)
        if ours.shape != theirs.shape:
            raise DepthcutError("the teacher's logits do not line up with the student's: distillation needs the "
                                "same tokenizer and vocabulary")
        for row in range(input_ids.shape[0]):
            kl = token_kl(ours[row], theirs[row], temperature)  # (T,)
            valid = attention_mask[row].bool()
            window_sum, window_count = float(kl[valid].double().sum()), int(valid.sum())
            total += window_sum
            count += window_count
            if window_count:
                window_kls.append(window_sum / window_count)
    mean = total / max(count, 1)
    return {"kl": mean, "kl_stderr": mean_stderr(window_kls), "temperature": temperature, "tokens": count,
            "data": windows.as_dict()}


def kl_line(before: dict | None, after: dict | None) -> str | None:
    """`held-out KL to the teacher 0.8123 -> 0.2310 (T=2)`, or None without a teacher."""
    if before is None or after is None:
        return None
    shown = f" (T={before['temperature']:g})" if before["temperature"] != 1 else ""
    return f"held-out KL to the teacher {before['kl']:.4f} -> {after['kl']:.4f}{shown}"

