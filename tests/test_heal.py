import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from heal_worker import DOCS, RECIPE
from tiny import CONFIGS, tiny_model
from transformers import AutoModelForCausalLM

from depthcut import DepthcutError
from depthcut.cli import main
from depthcut.healing.checkpoint import STATE_FILE, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from depthcut.healing.recipe import HealRecipe
from depthcut.healing.run import checkpoint_folder, heal_to
from depthcut.healing.targets import find_targets
from depthcut.healing.trainer import heal
from depthcut.io.data import TextSource, split_documents

WORKER = Path(__file__).parent / "heal_worker.py"
MLP_NAMES = {"llama": {"gate_proj", "up_proj", "down_proj"}, "gpt2": {"c_fc", "c_proj"}, "opt": {"fc1", "fc2"},
             "phi3": {"gate_up_proj", "down_proj"}, "gpt_neox": {"dense_h_to_4h", "dense_4h_to_h"},
             "falcon": {"dense_h_to_4h", "dense_4h_to_h"}}


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_mlp_targets_are_found_from_structure(arch):
    model = tiny_model(arch)
    mlp, attn, every = (find_targets(model, kind) for kind in ("mlp", "attn", "all-linear"))
    assert mlp and attn and sorted(mlp + attn) == sorted(every)
    assert not any("attn" in name or "attention" in name for name in mlp)
    if arch in MLP_NAMES:
        assert {name.rsplit(".", 1)[1] for name in mlp} == MLP_NAMES[arch]
        assert len(mlp) == 6 * len(MLP_NAMES[arch])


def test_target_names_and_no_match():
    model = tiny_model("llama")
    assert len(find_targets(model, "gate_proj,down_proj")) == 12
    with pytest.raises(DepthcutError, match=r"matches no linear layer.*mlp\.gate_proj \(mlp\)"):
        find_targets(model, "c_fc")


def test_split_documents_is_seeded_and_disjoint():
    train, held = split_documents(TextSource("d", DOCS), 0.1, seed=1)
    again, held_again = split_documents(TextSource("d", DOCS), 0.1, seed=1)
    assert len(held.documents) == 4 and len(train.documents) == 36
    assert held.documents == held_again.documents and train.documents == again.documents
    assert not set(map(id, held.documents)) & set(map(id, train.documents))


def test_healing_lowers_heldout_loss_and_merges(tokenizer, device):
    recipe = HealRecipe(rank=8, steps=25, seq_len=32, batch_size=4, warmup_steps=2, lr=5e-3, heldout_windows=4)
    result = heal(tiny_model("llama", device=device), tokenizer, TextSource("words", DOCS), recipe, progress=False)
    assert next(result.model.parameters()).device.type == device.type
    assert result.loss_after["loss"] < result.loss_before["loss"] - 0.05
    assert type(result.model).__name__ == "LlamaForCausalLM"  # merged: no peft wrapper left
    assert len(result.adapter) == 2 * 18  # lora_A and lora_B for 3 MLP projections x 6 layers
    assert result.log[-1]["loss"] < result.log[0]["loss"]


def _run_worker(tmp_path, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(WORKER), str(tmp_path / "ckpt"), str(tmp_path / "result.pt"), *extra],
                          check=False, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_weights(tmp_path):
    straight = tmp_path / "straight"
    straight.mkdir()
    assert _run_worker(straight).returncode == 0
    killed = tmp_path / "killed"
    killed.mkdir()
    crash = _run_worker(killed, "--die-at", "5")
    assert crash.returncode == 9
    assert sorted(p.name for p in (killed / "ckpt").iterdir()) == ["step-0000004"]  # steps 2, 4 saved; 2 removed
    resumed = _run_worker(killed, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    expected = torch.load(straight / "result-rank0.pt")
    got = torch.load(killed / "result-rank0.pt")
    assert got["losses"] == expected["losses"]
    for name, tensor in expected["state"].items():
        assert torch.equal(got["state"][name], tensor), name


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_of_another_run(tmp_path, tokenizer):
    crash = _run_worker(tmp_path, "--die-at", "3")
    assert crash.returncode == 9
    other = HealRecipe(**{**RECIPE.as_dict(), "lr": 1e-3})
    with pytest.raises(DepthcutError, match="different run.*lr"):
        heal(tiny_model("llama"), tokenizer, TextSource("words", DOCS), other, checkpoint_dir=tmp_path / "ckpt",
             resume=True, progress=False)


def _draws() -> tuple:
    """One draw of every generator a checkpoint restores, Gaussians included (they cache a second value)."""
    return random.random(), random.gauss(0, 1), float(np.random.standard_normal()), float(torch.rand(1))


def test_a_checkpoint_holds_only_tensors_and_plain_values_and_restores_every_generator(tmp_path):
    layer = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    layer(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.standard_normal()  # each now holds a cached Gaussian
    state = {"adapter": layer.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": rng_state(), "log": [{"step": 3, "loss": 1.5}]}
    expected = _draws()
    path = save_checkpoint(tmp_path, 3, state, {"lr": 0.1})

    raw = torch.load(path / STATE_FILE, weights_only=True)
    assert raw["step"] == 3 and torch.equal(raw["adapter"]["weight"], layer.weight.detach())
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    loaded = load_checkpoint(path, {"lr": 0.1})
    set_rng_state(loaded["rng"])
    assert _draws() == expected
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])


class _OpensAFile:
    """Unpickling this object would create a file: it stands for any code a pickle can run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_checkpoint_with_a_pickled_object_is_refused_not_run(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt", 2, {"log": []}, {"lr": 0.1})
    marker = tmp_path / "ran"
    torch.save({"format": 2, "step": 2, "log": [], "extra": _OpensAFile(marker)}, path / STATE_FILE)
    with pytest.raises(DepthcutError, match=r"holds a pickled `\S*open`: it was refused, not unpickled"):
        load_checkpoint(path, {"lr": 0.1})
    assert not marker.exists()


@pytest.mark.slow
def test_two_processes_train_data_parallel_and_agree(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               str(WORKER), str(tmp_path / "ckpt"), str(tmp_path / "result.pt")]
    run = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    first, second = (torch.load(tmp_path / f"result-rank{r}.pt") for r in (0, 1))
    assert first["losses"] == second["losses"]  # reduced across processes
    assert first["after"] < first["before"]
    for name, tensor in first["state"].items():
        assert torch.equal(second["state"][name], tensor), name


def test_heal_command_writes_a_reloadable_model_with_provenance(capsys, tmp_path, tiny_llama_dir, corpus_file,
                                                                 device):
    pruned = tmp_path / "pruned"
    assert main(["prune", str(tiny_llama_dir), "--layers", "2:4", "--out", str(pruned), "--quiet"]) == 0
    healed = tmp_path / "healed"
    code = main(["heal", str(pruned), "--data", str(corpus_file), "--out", str(healed), "--steps", "6", "--seq-len", "32",
                 "--batch-size", "2", "--rank", "4", "--warmup-steps", "1", "--checkpoint-every", "2",
                 "--heldout-windows", "2", "--device", str(device), "--quiet"])
    assert code == 0, capsys.readouterr().err
    provenance = json.loads((healed / "depthcut.json").read_text())
    assert provenance["pruning"]["removed_layers"] == [2, 3]
    assert provenance["healing"]["recipe"]["rank"] == 4 and provenance["healing"]["steps"] == 6
    assert len((healed / "train_log.jsonl").read_text().splitlines()) == 6
    assert (healed / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "healed-checkpoints").exists()
    model = AutoModelForCausalLM.from_pretrained(healed)
    assert model.config.num_hidden_layers == 4


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--rank", "0"], "--rank must be at least 1"),
        (["--seq-len", "4096"], "beyond this model's context of 128"),
        (["--targets", "q_proj_typo"], "matches no linear layer"),
        (["--batch-size", "500"], "too little training text"),
        # distillation settings that do not fit (TEACHER: the model itself)
        (["--objective", "kd"], "--objective kd distils from a teacher: give the unpruned model as --teacher MODEL"),
        (["--objective", "kd+lm"], "--objective kd+lm distils from a teacher"),
        (["--teacher", "TEACHER"], "--teacher needs --objective kd or kd+lm"),
        (["--teacher", "TEACHER", "--objective", "kd", "--kd-weight", "2"], "--kd-weight must be between 0 and 1"),
    ],
)
def test_heal_bad_input(capsys, tmp_path, tiny_llama_dir, corpus_file, extra, message):
    extra = [str(tiny_llama_dir) if part == "TEACHER" else part for part in extra]
    out = tmp_path / "healed"
    code = main(["heal", str(tiny_llama_dir), "--data", str(corpus_file), "--out", str(out), "--steps", "2",
                 "--seq-len", "32", "--batch-size", "2", "--quiet", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_qlora_without_bitsandbytes_says_how_to_install_it(capsys, tmp_path, tiny_llama_dir, corpus_file,
                                                           monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    out = tmp_path / "healed"
    code = main(["heal", str(tiny_llama_dir), "--data", str(corpus_file), "--out", str(out), "--steps", "2",
                 "--seq-len", "32", "--batch-size", "2", "--quiet", "--quantize", "4bit"])
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'depthcut[qlora]'" in err and "Traceback" not in err
    assert not out.exists()


def test_heal_to_writes_what_the_heal_command_writes(capsys, tmp_path, tiny_llama_dir, corpus_file, device):
    out = tmp_path / "healed"
    recipe = HealRecipe(rank=4, steps=4, seq_len=32, batch_size=2, warmup_steps=1, heldout_windows=2)
    result = heal_to(str(tiny_llama_dir), str(corpus_file), out, recipe, device=str(device), checkpoint_every=2,
                     progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["healed"]  # no checkpoints left, the claim's lock released
    assert f"loading {tiny_llama_dir} ..." in capsys.readouterr().err
    provenance = json.loads((out / "depthcut.json").read_text())
    assert provenance["healing"]["steps"] == 4 == len(result.log)
    assert provenance["base_model"]["spec"] == str(tiny_llama_dir)
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 4
    assert (out / "adapter" / "adapter_config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 6
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, result.model.state_dict()[name].cpu()), name


def test_heal_to_refuses_an_earlier_runs_checkpoints_without_resume_or_force(tmp_path, tiny_llama_dir, corpus_file):
    out = tmp_path / "healed"
    checkpoint_folder(out).mkdir()
    with pytest.raises(DepthcutError, match="pass --resume to continue it or --force to start over"):
        heal_to(str(tiny_llama_dir), str(corpus_file), out, HealRecipe(steps=2), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["healed-checkpoints"]
