"""Layer-streamed analysis against the in-memory analysis of the same checkpoint."""

import pytest
import torch
from test_analysis import _assert_close, _calibration
from tiny import tiny_model

import depthcut
from depthcut.errors import DepthcutError

# Sliding windows, per-layer attention types (masks differ by layer), tuple-returning layers,
# learned positions, a multimodal wrapper: the recorded layer calls must be the model's own.
ARCHS = ["llama", "qwen3", "gemma2", "gemma3", "gpt2", "opt", "falcon", "gpt_neox", "gemma3_vl"]
# The tiny checkpoints are saved in float32 and compared with the float32 model in memory: the
# dtype is named rather than left to the default (which may pick what the CPU computes fastest).
F32 = torch.float32


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
    streamed = depthcut.analyze_streamed(folder, data=calibration, batch_size=2, dtype=F32, spill_dir=tmp_path,
                                         progress=False)
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
                                         dtype=F32, spill_dir=tmp_path / "absent", progress=False)
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
    # the states are spilled as the model computed them, in bfloat16: half the bytes of float32
    config = model.config.get_text_config()
    assert streamed.metadata["streamed"]["spilled_dtype"] == "bfloat16"
    assert streamed.metadata["streamed"]["spilled_bytes"] == (config.num_hidden_layers + 1) \
        * int(calibration.attention_mask.sum()) * config.hidden_size * 2


def test_states_read_back_in_many_small_chunks_through_few_buffers(tmp_path, tokenizer, monkeypatch):
    """The read-back reuses two buffers (the last chunk is partial), the writes one buffer at a time."""
    from depthcut.analysis import spill as streaming_states

    model, folder = _saved("qwen3", tmp_path, tokenizer)
    config = model.config.get_text_config()
    row = (config.num_hidden_layers + 1) * config.hidden_size * 4
    monkeypatch.setattr(streaming_states, "READ_BACK_BYTES", 4 * row)  # chunks of 4 tokens, ending with a sequence
    monkeypatch.setattr(streaming_states, "SPILL_QUEUE", 0)  # each write waits for the one before
    # Every tensor written from and read into is kept alive here, so a fresh buffer could not reuse
    # a freed one's memory and pass for the same buffer.
    writes, reads = [], []
    write, read = streaming_states.SpilledStates.write, streaming_states.SpilledStates.read

    def recorded_write(self, position, first_token, states, ready=None):
        writes.append(states)
        return write(self, position, first_token, states, ready)

    def recorded_read(self, start, stop, into=None):
        reads.append((start, stop, into))
        return read(self, start, stop, into)

    monkeypatch.setattr(streaming_states.SpilledStates, "write", recorded_write)
    monkeypatch.setattr(streaming_states.SpilledStates, "read", recorded_read)
    calibration = _calibration([12, 7, 10, 5, 9])
    expected = depthcut.analyze(model, data=calibration, batch_size=2, progress=False)
    streamed = depthcut.analyze_streamed(folder, data=calibration, batch_size=2, dtype=F32, spill_dir=tmp_path,
                                         progress=False)
    for name in expected.metrics:
        _assert_close(streamed.metrics[name], expected.metrics[name], tol=1e-6)
    # writes: every position of every batch (3 batches of 2, 2, 1), all from the one buffer SPILL_QUEUE=0 leaves
    assert len(writes) == (config.num_hidden_layers + 1) * 3
    assert len({states.untyped_storage().data_ptr() for states in writes}) == 1
    # reads: one per chunk of whole sequences (here each longer than 4 tokens: one a chunk), in order,
    # covering every token once, alternating between two buffers
    ends = [12, 19, 29, 34, 43]  # the running sum of the sequence lengths
    assert [(start, stop) for start, stop, _ in reads] == list(zip([0, *ends[:-1]], ends))
    buffers = [into for _, _, into in reads]
    assert all(into is not None for into in buffers) and len({id(into) for into in buffers}) == 2
    assert all(buffers[i] is not buffers[i + 1] for i in range(len(buffers) - 1))


def test_block_influence_alone_spills_nothing(tmp_path, tokenizer):
    """Block Influence reads only cos(x_l, x_l+1): it is taken as each layer runs, not from a spill."""
    model, folder = _saved("gemma3", tmp_path, tokenizer)
    calibration = _calibration([12, 7, 10, 5, 9])
    expected = depthcut.analyze(model, data=calibration, batch_size=2, progress=False)
    streamed = depthcut.analyze_streamed(folder, data=calibration, batch_size=2, metrics=["block_influence"],
                                         dtype=F32, spill_dir=tmp_path / "absent", progress=False)
    assert list(streamed.metrics) == ["block_influence"]
    _assert_close(streamed.metrics["block_influence"], expected.metrics["block_influence"], tol=1e-6)
    assert streamed.metadata["streamed"]["spilled_bytes"] == 0


def test_at_most_two_layers_are_resident_and_the_next_is_read_while_one_computes(tmp_path, tokenizer, monkeypatch):
    """Layer i computes while layer i+1 is read (in another thread): never more than these two hold weights."""
    import re
    import threading

    from depthcut.analysis import checkpoint as streaming_checkpoint

    _, folder = _saved("llama", tmp_path, tokenizer)
    skeletons, reads, computes = [], [], []
    read_started = {}  # layer -> set once its first tensor is being read
    build, get = streaming_checkpoint.meta_skeleton, streaming_checkpoint.CheckpointReader.get

    def resident():
        return {i for i, layer in enumerate(skeletons[0].model.layers) if not next(layer.parameters()).is_meta}

    def watched_build(*args, **kwargs):
        skeleton = build(*args, **kwargs)
        model = skeleton.model
        skeletons.append(model)
        for index, layer in enumerate(model.model.layers):
            read_started[index] = threading.Event()

            def before(module, args, kwargs, index=index):
                if next(module.parameters()).is_meta:  # the recording pass: the layers have no weights yet
                    return
                if index + 1 < len(model.model.layers):  # the next layer is being read meanwhile
                    assert read_started[index + 1].wait(timeout=20), f"layer {index + 1} not read during {index}"
                computes.append((index, resident()))

            layer.register_forward_pre_hook(before, with_kwargs=True)
        return skeleton

    def watched_get(self, key, *args, **kwargs):
        match = re.search(r"\.layers\.(\d+)\.", key)
        if match:
            index = int(match.group(1))
            reads.append((index, resident()))
            read_started[index].set()
        return get(self, key, *args, **kwargs)

    monkeypatch.setattr(streaming_checkpoint, "meta_skeleton", watched_build)
    monkeypatch.setattr(streaming_checkpoint.CheckpointReader, "get", watched_get)
    analysis = depthcut.analyze_streamed(folder, data=_calibration([12, 7, 10]), batch_size=2, dtype=F32,
                                         spill_dir=tmp_path, progress=False)
    layers = analysis.num_layers
    assert sorted({index for index, _ in computes}) == list(range(layers))
    assert all(holding == {index} for index, holding in computes)  # computing: this layer's weights only
    assert sorted({index for index, _ in reads}) == list(range(layers))
    # reading layer i: at most layer i-1 holds weights (the one computing meanwhile), never more
    assert all(holding <= {index - 1} for index, holding in reads)
    assert analysis.metadata["streamed"]["resident_layers_at_most"] == 2


def test_a_failed_spill_write_stops_the_analysis(tmp_path, tokenizer, monkeypatch):
    from depthcut.analysis import spill as streaming_states

    _, folder = _saved("llama", tmp_path, tokenizer)

    def full_disk(self, *args):  # runs in the writer thread: its error must reach the caller
        raise DepthcutError(f"could not write the spilled states to {self.path} (is the disk full?)")

    monkeypatch.setattr(streaming_states.SpilledStates, "write", full_disk)
    with pytest.raises(DepthcutError, match="is the disk full"):
        depthcut.analyze_streamed(folder, data=_calibration([12, 7, 10]), batch_size=2, dtype=F32,
                                  spill_dir=tmp_path, progress=False)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("depthcut-spill")]  # cleaned up


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
    depthcut.analyze_streamed(folder, data=calibration, metrics=["angular_last_token"], dtype=F32, progress=False)
    other = tiny_model("llama", seed=5, num_hidden_layers=4)
    other.save_pretrained(folder)
    expected = depthcut.analyze(other, data=calibration, metrics=["angular_last_token"], progress=False)
    streamed = depthcut.analyze_streamed(folder, data=calibration, metrics=["angular_last_token"], dtype=F32,
                                         progress=False)
    _assert_close(streamed.metrics["angular_last_token"], expected.metrics["angular_last_token"], tol=1e-6)


def test_the_automatic_switch_weighs_the_weights_in_the_asked_dtype(tmp_path, tokenizer, monkeypatch):
    from depthcut.analysis import checkpoint as streaming_checkpoint

    _, folder = _saved("llama", tmp_path, tokenizer)  # saved in float32
    size = streaming_checkpoint.checkpoint_bytes(folder)
    cpu = torch.device("cpu")
    monkeypatch.setattr(streaming_checkpoint, "available_memory_bytes", lambda device: int(size * 0.7))
    assert streaming_checkpoint.would_not_fit(folder, None, cpu)  # float32 weights over 90% of memory
    assert streaming_checkpoint.would_not_fit(folder, torch.bfloat16, cpu) is None  # half of them fit
