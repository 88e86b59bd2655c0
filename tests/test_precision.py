"""`--dtype auto`: the dtype the hardware computes natively, with the reason recorded."""

import json
import os
import subprocess
import sys

import pytest
import torch

from depthcut.errors import DepthcutError
from depthcut.model import precision
from depthcut.model.precision import autocast_for, choose_dtype, cpu_bf16_support


@pytest.fixture
def fake_cpu(monkeypatch):
    """Pretend to be a CPU with a given ATen capability and /proc/cpuinfo flags."""

    def make(capability: str, flags: set[str] | None, timed_faster: bool = False):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.setattr(precision, "_cpu_flags", lambda: flags)
        monkeypatch.setattr(precision, "_bf16_product_is_faster", lambda: timed_faster)
        for name in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS"):
            monkeypatch.delenv(name, raising=False)

    return make


@pytest.mark.parametrize("capability, flags, native", [
    ("AVX2", {"avx2", "fma"}, False),
    ("AVX2", {"avx2", "avx512_bf16"}, False),  # ATEN_CPU_CAPABILITY=avx2 on a bf16 machine
    ("DEFAULT", None, False),
    ("AVX512", {"avx2", "avx512f"}, False),
    ("AVX512", {"avx512f", "avx512_bf16"}, True),
    ("AVX512", {"avx512f", "amx_bf16", "amx_tile"}, True),
])
def test_cpu_bf16_follows_the_capability_and_flags(fake_cpu, capability, flags, native):
    fake_cpu(capability, flags)
    got, reason = cpu_bf16_support()
    assert got is native
    assert capability in reason
    choice = choose_dtype("auto", "cpu")
    assert choice.dtype == (torch.bfloat16 if native else torch.float32)
    assert choice.reason.startswith("auto: ")


@pytest.mark.parametrize("variable, value", [("ONEDNN_MAX_CPU_ISA", "AVX2"), ("MKL_ENABLE_INSTRUCTIONS", "AVX2")])
def test_isa_caps_in_the_environment_are_honoured(fake_cpu, monkeypatch, variable, value):
    fake_cpu("AVX512", {"avx512_bf16"})
    monkeypatch.setenv(variable, value)
    native, reason = cpu_bf16_support()
    assert not native and variable in reason


@pytest.mark.parametrize("faster", [True, False])
def test_unreadable_flags_fall_back_to_a_timed_product(fake_cpu, faster):
    fake_cpu("SVE256", None, timed_faster=faster)
    native, reason = cpu_bf16_support()
    assert native is faster and "timed" in reason


def test_aten_capability_variable_is_honoured_in_a_fresh_process():
    code = "from depthcut.model.precision import choose_dtype; print(choose_dtype('auto', 'cpu').name)"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "float32"


def test_cuda_choice(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert choose_dtype("auto", "cuda").dtype == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert choose_dtype("auto", "cuda", checkpoint_dtype=torch.float16).dtype == torch.float16
    older = choose_dtype("auto", "cuda", checkpoint_dtype=torch.bfloat16)
    assert older.dtype == torch.float32 and "overflow" in older.reason
    assert autocast_for("cuda")[0] == "no"


def test_named_and_checkpoint_choices():
    assert choose_dtype("bf16").dtype == torch.bfloat16
    assert choose_dtype("float32").reason == "asked for"
    assert choose_dtype("checkpoint").dtype is None and choose_dtype("checkpoint").name == "checkpoint"
    assert choose_dtype(torch.float16).dtype == torch.float16
    with pytest.raises(DepthcutError, match="unknown dtype"):
        choose_dtype("float8")


@pytest.mark.parametrize("native", [True, False])
def test_load_model_auto_uses_and_records_the_choice(fake_cpu, tiny_llama_dir, native):
    from depthcut.model.loading import load_model

    fake_cpu("AVX512", {"avx512_bf16"} if native else {"avx512f"})
    model, _, source = load_model(str(tiny_llama_dir), dtype="auto", device="cpu")
    expected = torch.bfloat16 if native else torch.float32
    assert next(model.parameters()).dtype == expected
    assert source.as_dict()["dtype"] == {"asked": "auto", "dtype": str(expected).removeprefix("torch."),
                                         "reason": choose_dtype("auto", "cpu").reason}
    assert autocast_for("cpu")[0] == ("bf16" if native else "no")


def test_checkpoint_keeps_the_stored_dtype(tiny_llama_dir, tmp_path):
    from depthcut.model.loading import load_model

    model, _, _ = load_model(str(tiny_llama_dir), dtype="bfloat16")
    model.save_pretrained(tmp_path / "bf16")
    reloaded, _, source = load_model(str(tmp_path / "bf16"), dtype="checkpoint", with_tokenizer=False)
    assert next(reloaded.parameters()).dtype == torch.bfloat16
    assert source.dtype.name == "checkpoint"


def test_analyze_output_records_the_choice(tiny_llama_dir, corpus_file, tmp_path, capsys):
    from depthcut.cli import main

    out = tmp_path / "run"
    precision._announced.clear()  # printed once a process: forget earlier tests' prints
    assert main(["analyze", str(tiny_llama_dir), "--data", str(corpus_file), "--samples", "4", "--seq-len", "16",
                 "--out", str(out), "--quiet"]) == 0
    recorded = json.loads((out / "analysis.json").read_text())["metadata"]["model"]["dtype"]
    assert recorded == choose_dtype("auto", "cpu").as_dict()
    assert f"dtype: {choose_dtype('auto', 'cpu')}" in capsys.readouterr().err
