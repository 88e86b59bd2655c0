"""The test device itself: `--device` / $DEPTHCUT_TEST_DEVICE reach the models under test, and the
code paths that move tensors between devices (layer streaming, hidden states parked on the CPU)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_analysis import _assert_close, _calibration
from tiny import tiny_model, tolerance

import depthcut

TESTS = Path(__file__).parent


def test_the_model_under_test_sits_on_the_chosen_device(device, pytestconfig):
    asked = pytestconfig.getoption("--device") or os.environ.get("DEPTHCUT_TEST_DEVICE") or "cpu"
    assert device.type == torch.device(asked).type
    model = tiny_model("llama", device=device)
    assert {p.device for p in model.parameters()} == {device}
    analysis = depthcut.analyze(model, data=_calibration([8, 6]), progress=False)
    assert analysis.metadata["device"] == str(device)
    if device.type == "cuda":
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32


def _pytest(*args: str, env: dict) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--no-header",
               str(TESTS / "test_device.py") + "::test_the_model_under_test_sits_on_the_chosen_device", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, **env})


@pytest.mark.slow
def test_the_option_outranks_the_environment_and_a_missing_device_is_refused():
    # No machine has a 100th GPU: the variable alone is read, and refused before any test runs...
    refused = _pytest(env={"DEPTHCUT_TEST_DEVICE": "cuda:99"})
    assert refused.returncode == pytest.ExitCode.USAGE_ERROR
    assert "--device 'cuda:99' asked for, but this machine has" in refused.stderr
    # ...and --device overrides it.
    chosen = _pytest("--device", "cpu", env={"DEPTHCUT_TEST_DEVICE": "cuda:99"})
    assert chosen.returncode == 0, chosen.stdout + chosen.stderr
    assert "1 passed" in chosen.stdout


@pytest.mark.parametrize("offload_states", [False, True])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_streamed_analysis_on_the_device_equals_the_in_memory_analysis(arch, offload_states, device, tmp_path,
                                                                      tokenizer):
    """Layers are read from disk onto the device; the samples' hidden states wait there between
    layers, or in CPU memory (`offload_states`), as they do when they would crowd a GPU."""
    model = tiny_model(arch)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    calibration = _calibration([12, 7, 10, 5, 9])
    expected = depthcut.analyze(model.to(device), data=calibration, batch_size=2, progress=False)
    streamed = depthcut.analyze_streamed(tmp_path / "model", data=calibration, batch_size=2, device=device,
                                         spill_dir=tmp_path, offload_states=offload_states, dtype="float32",
                                         progress=False)
    assert streamed.metadata["device"] == str(device)
    assert streamed.metadata["streamed"]["hidden_states_on"] == ("cpu" if offload_states else str(device))
    for name in expected.metrics:
        _assert_close(streamed.metrics[name], expected.metrics[name], tol=tolerance(device, 1e-6, 1e-5))
