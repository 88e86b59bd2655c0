"""What a heal prints: nothing about bitsandbytes' hub kernel when no quantization was asked.

Wrapping a model with LoRA makes peft import bitsandbytes where it is installed; on a CPU with
AVX512-BF16 its backend then looks up a hub kernel that depthcut never uses, and, offline, the
`kernels` package used to warn on every heal (depthcut.healing.quiet). Fresh processes: in this one
bitsandbytes may already have been imported by another test, and the lookup happens once."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from depthcut.healing.quiet import UNUSED_KERNEL_REPO


def _python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.slow
def test_a_heal_without_quantization_says_nothing_of_the_unused_bitsandbytes_kernel(tmp_path, tiny_llama_dir,
                                                                                      corpus_file):
    pytest.importorskip("bitsandbytes")
    imported = _python("-c", "import bitsandbytes")
    if UNUSED_KERNEL_REPO not in imported.stderr:
        pytest.skip("bitsandbytes looks up no hub kernel on this CPU: nothing to silence")
    healed = _python("-m", "depthcut", "heal", str(tiny_llama_dir), "--data", str(corpus_file), "--out",
                     str(tmp_path / "healed"), "--steps", "1", "--seq-len", "16", "--batch-size", "2",
                     "--heldout-windows", "2", "--quiet")
    assert healed.returncode == 0, healed.stderr
    assert (tmp_path / "healed" / "model.safetensors").is_file()
    assert UNUSED_KERNEL_REPO not in healed.stderr and "publisher trust" not in healed.stderr, healed.stderr
