"""QLoRA end to end on a tiny model: 4-bit base -> heal -> merge into full precision -> save -> reload.

bitsandbytes >= 0.46 has CPU kernels, so this runs in the normal suite (and on CUDA with --device cuda).
"""

import json

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from depthcut.cli import main
from depthcut.healing.recipe import HealRecipe
from depthcut.healing.trainer import full_precision_loader, heal, keep_4bit_differentiable
from depthcut.io.data import TextSource, load_texts
from depthcut.model.loading import load_model

# bitsandbytes quantizes in blocks of 64 inputs: the tiny model needs widths that are multiples of it.
WIDTHS = {"hidden_size": 64, "intermediate_size": 128, "head_dim": 16}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    from tiny import tiny_model

    folder = tmp_path_factory.mktemp("tiny-llama-64")
    tiny_model("llama", **WIDTHS).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _recipe(**overrides):
    values = {"rank": 8, "steps": 12, "seq_len": 32, "batch_size": 4, "warmup_steps": 1, "lr": 3e-3, "seed": 0,
              "heldout_windows": 4, "heldout_fraction": 0.1}
    return HealRecipe(**{**values, **overrides})


def test_the_cli_writes_a_merged_full_precision_model_that_reloads(model_dir, corpus_file, tmp_path, device):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "healed"
    code = main(["heal", str(model_dir), "--data", str(corpus_file), "--out", str(out), "--quantize", "4bit",
                 "--rank", "8", "--steps", "6", "--seq-len", "32", "--batch-size", "4", "--warmup-steps", "1",
                 "--lr", "3e-3", "--dtype", "float32", "--device", str(device), "--quiet"])
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config  # a plain model, not a 4-bit one
    AutoTokenizer.from_pretrained(out)  # the tokenizer kept no model arguments (it used to fail to save)
    healed = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    # Reference: every merged weight is the full-precision base weight plus (alpha / r) B @ A.
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    scale = json.loads((out / "adapter" / "adapter_config.json").read_text())["lora_alpha"] / 8
    merged_names = set()
    for key, lora_a in adapter.items():
        if "lora_A" not in key:
            continue
        name = key.removeprefix("base_model.model.").replace(".lora_A.weight", "")
        lora_b = adapter[key.replace("lora_A", "lora_B")]
        expected = base.get_submodule(name).weight + scale * (lora_b.float() @ lora_a.float())
        torch.testing.assert_close(healed.get_submodule(name).weight, expected, atol=1e-5, rtol=1e-5)
        assert (lora_b != 0).any(), f"{name}: the adapter never trained"
        merged_names.add(name)
    assert merged_names and all("mlp" in name for name in merged_names)
    untouched = [n for n, _ in base.named_parameters() if not any(n.startswith(m) for m in merged_names)]
    for name in untouched:
        torch.testing.assert_close(healed.get_parameter(name), base.get_parameter(name))

    provenance = json.loads((out / "depthcut.json").read_text())["healing"]
    assert provenance["recipe"]["quantize"] == "4bit"
    assert provenance["loss_after_adapter"]["loss"] > 0

    ids = torch.tensor([[1, 5, 9, 14, 20, 33]])
    cached = healed.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = healed.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def _dequantized_reference(quantized, plain):
    """`plain` with each 4-bit layer's weight replaced by its dequantized NF4 values."""
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            plain.get_submodule(name).weight.data.copy_(weight.float().to(plain.device))
    return plain


def test_gradients_flow_through_4bit_layers_after_an_eval_pass(model_dir, device):
    """On AVX512-BF16 CPUs bitsandbytes repacks a 4-bit weight on an eval pass and then uses a kernel
    without backward in training too; healing keeps the differentiable path. Checked against a
    float model holding the same (dequantized) weights."""
    quantized, _, _ = load_model(str(model_dir), dtype="float32", device=device, quantize="4bit",
                                 with_tokenizer=False)
    keep_4bit_differentiable(quantized)
    ids = torch.tensor([[1, 7, 12, 30, 41, 8, 19, 3]], device=quantized.device)
    with torch.inference_mode():
        quantized(input_ids=ids)  # what the held-out loss before training does
    plain, _, _ = load_model(str(model_dir), dtype="float32", device=device, with_tokenizer=False)
    reference = _dequantized_reference(quantized, plain)

    grads = []
    for model in (quantized, reference):
        model.train()
        embeds = model.get_input_embeddings()(ids).detach().float().requires_grad_(True)
        loss = model(inputs_embeds=embeds, labels=ids).loss
        loss.backward()
        grads.append(embeds.grad)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=2e-4, rtol=2e-3)


def test_qlora_trains_as_lora_does(model_dir, corpus_file, device):
    """Same data, steps and seed: the 4-bit base with LoRA lowers the held-out loss comparably to LoRA."""
    data = load_texts(str(corpus_file))
    drops = {}
    for quantize in (None, "4bit"):
        model, tokenizer, _ = load_model(str(model_dir), dtype="float32", device=device, quantize=quantize)
        result = heal(model, tokenizer, TextSource(data.description, data.documents), _recipe(quantize=quantize),
                      progress=False, full_precision_base=full_precision_loader(str(model_dir), dtype="float32",
                                                                                device=device))
        drops[quantize] = result.loss_before["loss"] - result.loss_after["loss"]
        if quantize:
            assert result.loss_after_adapter["loss"] < result.loss_before["loss"]
    assert drops[None] > 0.2
    assert drops["4bit"] > 0.5 * drops[None], drops
