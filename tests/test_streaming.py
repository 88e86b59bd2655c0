"""Layer-streamed analysis against the in-memory analysis of the same checkpoint."""

import pytest
import torch

import depthcut
from depthcut.errors import DepthcutError
from test_analysis import _assert_close, _calibration
from tiny import tiny_model

# Sliding windows, per-layer attention types (masks differ by layer), tuple-returning layers,
# learned positions, a multimodal wrapper: the recorded layer calls must be the model's own.
ARCHS = ["llama", "qwen3", "gemma2", "gemma3", "gpt2", "opt", "falcon", "gpt_neox", "gemma3_vl"]


def _saved(arch, tmp_path, tokenizer, **save):
    model = tiny_model(arch)
    folder = tmp_path / arch
    model.save_pretrained(folder, **save)
    tokenizer.save_pretrained(folder)
    return model, folder


@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_analysis_equals_the_in_memory_analysis(arch, tmp_path, tokenizer):
    model, folder = _saved(arch, tmp_path, tokenizer)
    calibration = _calibration([12, 7, 10, 5, 9])
    expected = depthcut.analyze(model, data=calibration, batch_size=2, progress=False)
    streamed = depthcut.analyze_streamed(folder, data=calibration, batch_size=2, spill_dir=tmp_path, progress=False)
    assert streamed.num_layers == expected.num_layers
    for name in expected.metrics:
        _assert_close(streamed.metrics[name], expected.metrics[name], tol=1e-6)
    assert streamed.metadata["layer_path"] == expected.metadata["layer_path"]
    assert streamed.metadata["streamed"]["spilled_bytes"] == (model.config.get_text_config().num_hidden_layers + 1) \
        * int(calibration.attention_mask.sum()) * model.config.get_text_config().hidden_size * 4
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("depthcut-spill")] == []  # spill removed


def test_sharded_checkpoint_streams_and_only_last_token_metrics_spill_nothing(tmp_path, tokenizer):
    model, folder = _saved("llama", tmp_path, tokenizer, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("*.safetensors"))) > 2
    calibration = _calibration([12, 7, 10, 5, 9])
    expected = depthcut.analyze(model, data=calibration, batch_size=3, metrics=["angular_last_token"], progress=False)
    streamed = depthcut.analyze_streamed(folder, data=calibration, batch_size=3, metrics=["angular_last_token"],
                                         spill_dir=tmp_path / "absent", progress=False)
    _assert_close(streamed.metrics["angular_last_token"], expected.metrics["angular_last_token"], tol=1e-6)
    assert streamed.metadata["streamed"]["spilled_bytes"] == 0


def test_bfloat16_streamed_analysis_equals_the_in_memory_bfloat16_analysis(tmp_path, tokenizer):
    _, folder = _saved("llama", tmp_path, tokenizer)
    model, _, _ = depthcut.load_model(str(folder), dtype="bfloat16")
    calibration = _calibration([12, 7, 10, 5, 9])
    expected = depthcut.analyze(model, data=calibration, batch_size=2, progress=False)
    streamed = depthcut.analyze_streamed(folder, data=calibration, batch_size=2, dtype="bfloat16",
                                         offload_states=True, progress=False)
    assert streamed.metadata["dtype"] == "bfloat16" and streamed.metadata["streamed"]["hidden_states_on"] == "cpu"
    for name in expected.metrics:
        _assert_close(streamed.metrics[name], expected.metrics[name], tol=1e-6)


def test_only_one_layer_is_resident_at_a_time(tmp_path, tokenizer, monkeypatch):
    from depthcut import streaming

    _, folder = _saved("llama", tmp_path, tokenizer)
    resident = []
    original = streaming._load_parameters

    def watch(module, names, *args):
        loaded = original(module, names, *args)
        if not resident:  # the first load: everything outside the layers, into the skeleton
            watch.layers = module.model.layers
            resident.append("outside")
        else:  # a layer was just loaded: count the layers that now hold real weights
            resident.append(sum(not next(layer.parameters()).is_meta for layer in watch.layers))
        return loaded

    monkeypatch.setattr(streaming, "_load_parameters", watch)
    depthcut.analyze_streamed(folder, data=_calibration([12, 7, 10]), batch_size=2, spill_dir=tmp_path, progress=False)
    assert resident == ["outside"] + [1] * 6


def test_too_little_disk_for_spilled_states_is_refused_before_any_work(tmp_path, tokenizer, monkeypatch):
    import shutil
    from collections import namedtuple

    _, folder = _saved("llama", tmp_path, tokenizer)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: namedtuple("usage", "total used free")(10**6, 10**6, 1000))
    with pytest.raises(DepthcutError, match="GiB free; pass --spill-dir"):
        depthcut.analyze_streamed(folder, data=_calibration([12, 7, 10]), spill_dir=tmp_path, progress=False)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("depthcut-spill")]


def test_a_missing_tensor_or_a_folder_without_safetensors_is_a_clear_error(tmp_path, tokenizer):
    from safetensors.torch import load_file, save_file

    _, folder = _saved("llama", tmp_path, tokenizer)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.3.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DepthcutError, match="no tensor for model.layers.3.mlp.up_proj.weight"):
        depthcut.analyze_streamed(folder, data=_calibration([12, 7]), spill_dir=tmp_path, progress=False)
    with pytest.raises(DepthcutError, match="needs a local folder with config.json and safetensors"):
        depthcut.analyze_streamed(tmp_path / "nothing", data=_calibration([12, 7]), progress=False)


def test_a_checkpoint_rewritten_in_place_is_read_afresh(tmp_path, tokenizer):
    """Shard headers are cached; saving another model into the same folder must not reuse them."""
    _, folder = _saved("llama", tmp_path, tokenizer)
    calibration = _calibration([12, 7, 10])
    depthcut.analyze_streamed(folder, data=calibration, metrics=["angular_last_token"], progress=False)
    other = tiny_model("llama", seed=5, num_hidden_layers=4)
    other.save_pretrained(folder)
    expected = depthcut.analyze(other, data=calibration, metrics=["angular_last_token"], progress=False)
    streamed = depthcut.analyze_streamed(folder, data=calibration, metrics=["angular_last_token"], progress=False)
    _assert_close(streamed.metrics["angular_last_token"], expected.metrics["angular_last_token"], tol=1e-6)


def test_the_automatic_switch_weighs_the_weights_in_the_asked_dtype(tmp_path, tokenizer, monkeypatch):
    from depthcut import streaming

    _, folder = _saved("llama", tmp_path, tokenizer)  # saved in float32
    size = streaming.checkpoint_bytes(folder)
    cpu = torch.device("cpu")
    monkeypatch.setattr(streaming, "available_memory_bytes", lambda device: int(size * 0.7))
    assert streaming.would_not_fit(folder, None, cpu)  # float32 weights over 90% of memory
    assert streaming.would_not_fit(folder, torch.bfloat16, cpu) is None  # half of them fit
