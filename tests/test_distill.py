"""Distillation healing: the KD loss against a naive reference, and heal runs with a teacher."""

import json

import pytest
import torch
import torch.nn.functional as F
from heal_worker import DOCS
from tiny import tiny_model

from depthcut import DepthcutError
from depthcut.cli import main
from depthcut.healing.distill import distillation_loss, teacher_logits
from depthcut.healing.recipe import HealRecipe
from depthcut.healing.trainer import heal
from depthcut.io.data import TextSource
from depthcut.model.surgery import prune

KD_RECIPE = HealRecipe(rank=4, steps=8, seq_len=24, batch_size=2, grad_accum=2, warmup_steps=2, lr=5e-3, dropout=0.1,
                       heldout_windows=2, objective="kd+lm", kd_temperature=2.0, kd_weight=0.7)


def _reference(student, teacher, mask, temperature):
    """tau^2 * KL(teacher || student) per position with F.kl_div in float64, averaged over the mask."""
    log_s = (student.double() / temperature).log_softmax(-1)
    log_t = (teacher.double() / temperature).log_softmax(-1)
    per_position = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)  # (B, T)
    return (per_position * mask).sum() / mask.sum() * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_kd_loss_equals_a_naive_reference_with_padding(temperature, chunk_rows):
    torch.manual_seed(0)
    student = (3 * torch.randn(3, 9, 50)).requires_grad_()
    teacher = 3 * torch.randn(3, 9, 50)
    mask = torch.ones(3, 9)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    teacher[mask == 0] = 1e4  # padding: whatever its logits, it counts for nothing
    loss = distillation_loss(student, teacher, mask, temperature, chunk_rows=chunk_rows)
    assert loss.dtype == torch.float32
    reference_student = student.detach().double().requires_grad_()
    reference = _reference(reference_student, teacher, mask, temperature)
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(loss, student)
    (expected,) = torch.autograd.grad(reference, reference_student)
    torch.testing.assert_close(grad.double(), expected, rtol=1e-4, atol=1e-8)
    assert not grad[mask == 0].any()


def test_kd_gradient_passes_gradcheck_in_float64():
    torch.manual_seed(1)
    student = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 5, 7, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    assert torch.autograd.gradcheck(lambda s: distillation_loss(s, teacher, mask, 1.5, chunk_rows=3), (student,))


def test_bf16_logits_give_a_float32_loss_and_bf16_gradients():
    torch.manual_seed(2)
    student = torch.randn(2, 6, 40).bfloat16().requires_grad_()
    teacher = torch.randn(2, 6, 40).bfloat16()
    loss = distillation_loss(student, teacher)
    loss.backward()
    assert loss.dtype == torch.float32 and student.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), _reference(student.detach(), teacher, torch.ones(2, 6), 1.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_teacher_equal_to_the_student_gives_zero_loss_and_zero_gradient(dtype):
    model = tiny_model("llama").to(dtype)
    ids = torch.randint(3, 96, (2, 16))
    student = model(input_ids=ids).logits
    loss = distillation_loss(student, teacher_logits(model, ids), temperature=2.0)
    loss.backward()
    assert loss.item() == 0.0
    assert all(not p.grad.any() for p in model.parameters() if p.grad is not None)


def test_the_kd_loss_refuses_logits_of_another_vocabulary():
    with pytest.raises(DepthcutError, match="same tokenizer and vocabulary"):
        distillation_loss(torch.zeros(1, 4, 10), torch.zeros(1, 4, 12))


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"objective": "kl"}, "--objective must be one of lm, kd, kd\\+lm"),
        ({"kd_temperature": 0.0}, "--kd-temperature must be positive"),
        ({"kd_weight": 1.5}, "--kd-weight must be between 0 and 1"),
    ],
)
def test_recipe_checks_the_distillation_settings(fields, message):
    with pytest.raises(DepthcutError, match=message):
        HealRecipe(**fields)


def _pruned(device=None):
    return prune(tiny_model("llama", device=device), [2, 3])


def test_distillation_lowers_the_heldout_kl_to_the_unpruned_model(tokenizer, device):
    recipe = HealRecipe(rank=8, steps=20, seq_len=32, batch_size=4, warmup_steps=2, lr=2e-2, heldout_windows=4,
                        objective="kd")
    teacher = tiny_model("llama", device=device)
    result = heal(_pruned(device), tokenizer, TextSource("words", DOCS), recipe, teacher=teacher, progress=False)
    assert result.kl_before["kl"] > 0 and result.kl_before["tokens"] == 4 * 32
    assert result.kl_after["kl"] < 0.7 * result.kl_before["kl"]  # about 0.5 on the CPU
    assert result.log[-1]["loss"] < result.log[0]["loss"]
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training


def test_distillation_needs_a_teacher_of_the_same_vocabulary(tokenizer):
    data = TextSource("words", DOCS)
    with pytest.raises(DepthcutError, match="objective 'kd' distils from a teacher"):
        heal(_pruned(), tokenizer, data, HealRecipe(objective="kd", steps=2, seq_len=24, batch_size=2))
    with pytest.raises(DepthcutError, match="the teacher's vocabulary has 80 tokens, the student's 96"):
        heal(_pruned(), tokenizer, data, HealRecipe(objective="kd", steps=2, seq_len=24, batch_size=2),
             teacher=tiny_model("llama", vocab_size=80))


class _Killed(Exception):
    pass


def _kd_run(tokenizer, checkpoints, die_at=None, resume=False):
    def on_step(step, entry):
        if step == die_at:
            raise _Killed

    return heal(_pruned(), tokenizer, TextSource("words", DOCS), KD_RECIPE, teacher=tiny_model("llama"),
                checkpoint_dir=checkpoints, checkpoint_every=2, resume=resume, progress=False, on_step=on_step)


def test_an_interrupted_kd_lm_run_resumes_to_the_same_weights(tmp_path, tokenizer):
    straight = _kd_run(tokenizer, tmp_path / "straight")
    with pytest.raises(_Killed):
        _kd_run(tokenizer, tmp_path / "killed", die_at=5)
    assert sorted(p.name for p in (tmp_path / "killed").iterdir()) == ["step-0000004"]
    resumed = _kd_run(tokenizer, tmp_path / "killed", resume=True)
    assert resumed.steps == 4
    assert [e["loss"] for e in resumed.log] == [e["loss"] for e in straight.log]
    assert {"kd", "lm"} <= set(straight.log[0])
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], tensor), name


def test_a_checkpoint_of_another_temperature_is_refused(tmp_path, tokenizer):
    with pytest.raises(_Killed):
        _kd_run(tokenizer, tmp_path, die_at=3)
    other = HealRecipe(**{**KD_RECIPE.as_dict(), "kd_temperature": 1.0})
    with pytest.raises(DepthcutError, match="different run.*kd_temperature"):
        heal(_pruned(), tokenizer, TextSource("words", DOCS), other, teacher=tiny_model("llama"),
             checkpoint_dir=tmp_path, resume=True, progress=False)


def test_heal_command_distils_and_records_the_teacher(capsys, tmp_path, tiny_llama_dir, corpus_file, device):
    pruned = tmp_path / "pruned"
    assert main(["prune", str(tiny_llama_dir), "--layers", "2:4", "--out", str(pruned), "--quiet"]) == 0
    healed = tmp_path / "healed"
    code = main(["heal", str(pruned), "--teacher", str(tiny_llama_dir), "--objective", "kd", "--kd-temperature", "2",
                 "--data", str(corpus_file), "--out", str(healed), "--steps", "4", "--seq-len", "32",
                 "--batch-size", "2", "--rank", "4", "--warmup-steps", "1", "--heldout-windows", "2",
                 "--device", str(device), "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "held-out KL to the teacher" in captured.out
    healing = json.loads((healed / "depthcut.json").read_text())["healing"]
    assert healing["objective"] == "kd" == healing["recipe"]["objective"]
    assert healing["recipe"]["kd_temperature"] == 2.0
    assert healing["teacher"]["spec"] == str(tiny_llama_dir)
    assert healing["kl_after"]["kl"] >= 0 and healing["kl_before"]["temperature"] == 2.0
    assert "distillation" in (healed / "README.md").read_text()
    assert len((healed / "train_log.jsonl").read_text().splitlines()) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["healed", "pruned"]
