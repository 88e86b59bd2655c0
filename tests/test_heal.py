import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from heal_worker import DOCS, RECIPE
from tiny import CONFIGS, tiny_model
from transformers import AutoModelForCausalLM

from depthcut import DepthcutError
from depthcut.cli import main
from depthcut.data import TextSource
from depthcut.healing.recipe import HealRecipe
from depthcut.healing.targets import find_targets
from depthcut.healing.trainer import heal, split_documents

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
                          capture_output=True, text=True, timeout=300)


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


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path, tokenizer):
    crash = _run_worker(tmp_path, "--die-at", "3")
    assert crash.returncode == 9
    other = HealRecipe(**{**RECIPE.as_dict(), "lr": 1e-3})
    with pytest.raises(DepthcutError, match="different run.*lr"):
        heal(tiny_model("llama"), tokenizer, TextSource("words", DOCS), other, checkpoint_dir=tmp_path / "ckpt",
             resume=True, progress=False)


def test_two_processes_train_data_parallel_and_agree(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               str(WORKER), str(tmp_path / "ckpt"), str(tmp_path / "result.pt")]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
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
    ],
)
def test_heal_bad_input(capsys, tmp_path, tiny_llama_dir, corpus_file, extra, message):
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
