"""Layer-streamed analysis: a model larger than memory, one decoder layer resident at a time.

The model is built as a skeleton on the meta device (parameters without storage; buffers such as
rotary frequencies are computed for real). Then:

1. Embeddings. The parameters outside the decoder stack are read from the safetensors shards,
   except an untied output head (never needed). For every calibration batch the model's own
   forward runs with each decoder layer replaced by a recorder that keeps the layer's call
   (arguments and keywords: masks, position embeddings, ...) and passes the hidden state on, so
   the per-layer inputs are exactly what the model would give its layers. The embeddings are
   freed afterwards.
2. Layers. Layer l's weights are read from the shards, every batch's hidden state goes through
   it with the call recorded for that batch, and the weights are freed before layer l+1.

The residual stream is captured at the same positions and with the same arithmetic as the
in-memory path (`depthcut.capture`), and fed to the same metric accumulators. Unit vectors at
each sequence's last token stay in memory ((samples, L+1, hidden) float32). The all-token
metrics need every token's state at every position at once, so those unit vectors are spilled
to a file, position after position, and read back in token chunks for the cosine pass; the disk
space this takes is checked before anything runs.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from depthcut.capture import StopForward, _store_unit, last_positions
from depthcut.errors import DepthcutError
from depthcut.layers import LayerStack, find_layer_stack, first_tensor, output_tensor, text_config
from depthcut.shards import INDEX_FILE, SINGLE_FILE, model_names, safetensors_header, shard_map

READ_BACK_BYTES = 16 * 2**20  # the spilled states are read back in chunks of about this size


def chunk_tokens(positions: int, width: int) -> int:
    """Tokens per read-back chunk of the all-token cosine pass: (tokens, L+1, H) float32 within budget."""
    return max(1, READ_BACK_BYTES // (positions * width * 4))


def is_safetensors_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file() and (
        (path / INDEX_FILE).is_file() or (path / SINGLE_FILE).is_file()
    )


def checkpoint_bytes(folder: str | Path) -> int:
    """The size of the checkpoint's tensors, from the shard files."""
    folder = Path(folder)
    return sum((folder / shard).stat().st_size for shard in set(shard_map(folder).values()))


def available_memory_bytes(device: torch.device) -> int | None:
    """Free memory of `device` (CUDA) or available RAM (Linux `MemAvailable`); None if unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def would_not_fit(folder: str | Path, dtype: torch.dtype | None, device: torch.device,
                  headroom: float = 0.9) -> str | None:
    """Why the model in `folder` should be streamed (its weights in `dtype` take more than
    `headroom` of the memory available on `device`), or None."""
    import json

    size = checkpoint_bytes(folder)
    saved = checkpoint_dtype(json.loads((Path(folder) / "config.json").read_text()))
    if dtype is not None and saved is not None:
        size = size * dtype.itemsize // saved.itemsize
    available = available_memory_bytes(device)
    if available is None or size <= headroom * available:
        return None
    return f"the weights take {size / 2**30:.1f} GiB and {available / 2**30:.1f} GiB is available on {device}"


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class CheckpointReader:
    """Tensors by name from a folder of safetensors shards, one tensor read at a time.

    The bytes are read with plain file reads, not through a memory map: mapped pages of a shard
    stay in the process's resident set while the file is open, which would bring the whole
    checkpoint back into memory layer by layer.
    """

    def __init__(self, folder: str | Path, model):
        self.folder = Path(folder)
        self.weight_map = shard_map(self.folder)
        names, self.converted = model_names(self.weight_map, model)
        self.keys = {name: key for key, name in names.items() if key not in self.converted}

    def key_for(self, name: str) -> str | None:
        """The checkpoint's name of the model parameter `name`."""
        return self.keys.get(name)

    def get(self, key: str) -> torch.Tensor:
        path = self.folder / self.weight_map[key]
        header, data_start = safetensors_header(path)
        entry = header[key]
        start, end = entry["data_offsets"]
        buffer = bytearray(end - start)
        with path.open("rb", buffering=0) as handle:
            handle.seek(data_start + start)
            if handle.readinto(memoryview(buffer)) != len(buffer):
                raise DepthcutError(f"{path} is truncated (tensor {key})")
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        if not buffer:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(entry["shape"])


def checkpoint_dtype(config) -> torch.dtype | None:
    """The dtype a config (a transformers config or its JSON as a dict) says the weights are saved in."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    value = get("dtype") or get("torch_dtype")
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def build_skeleton(folder: str | Path, dtype: torch.dtype | None, device: torch.device,
                   trust_remote_code: bool = False):
    """The model without weights: parameters on the meta device, buffers computed and put on `device`."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    dtype = dtype or checkpoint_dtype(config) or torch.float32
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)
    return model.eval(), dtype


@functools.cache
def _malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


def _release_freed_memory() -> None:
    """Hand memory freed by the last batch or layer back to the system. Weights and activations
    come in sizes that glibc serves from its heap, and a heap keeps what it frees: without this,
    the resident set would creep up by about a layer's size per layer."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _load_parameters(module: torch.nn.Module, names: dict[str, str], reader: CheckpointReader,
                     dtype: torch.dtype | None, device: torch.device) -> int:
    """Give `module` the checkpoint tensors `names` (parameter name in module -> checkpoint key); returns bytes."""
    state, total = {}, 0
    for name, key in names.items():
        tensor = reader.get(key)
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[name] = tensor.to(device)
        total += state[name].numel() * state[name].element_size()
    module.load_state_dict(state, strict=False, assign=True)
    return total


def _parameter_keys(module: torch.nn.Module, path: str, reader: CheckpointReader,
                    skip: set[int] = frozenset()) -> dict[str, str]:
    keys, missing = {}, []
    for name, param in module.named_parameters():
        if id(param) in skip:
            continue
        key = reader.key_for(f"{path}.{name}" if path else name)
        if key is None:
            missing.append(f"{path}.{name}" if path else name)
        else:
            keys[name] = key
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        why = (" (its weights are converted on load, e.g. fused experts, which streaming does not do)"
               if reader.converted else "")
        raise DepthcutError(f"the checkpoint in {reader.folder} has no tensor for {shown}{why}")
    return keys


def _replace_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """The call (args, kwargs) with its hidden state (as `first_tensor` finds it) replaced."""
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return args, {**kwargs, "hidden_states": hidden}
    for index, value in enumerate(args):
        if isinstance(value, torch.Tensor):
            return (*args[:index], hidden, *args[index + 1 :]), kwargs
    raise RuntimeError("could not find the hidden state among a decoder layer's inputs")


# How a layer hands its hidden state back: most return the tensor, older ones a tuple (`outputs[0]`).
_OUTPUT_STYLES = (lambda hidden: hidden, lambda hidden: (hidden,))


@contextmanager
def _recording_layers(stack: LayerStack, record, style):
    """Replace every layer's forward by one that hands its call to `record(args, kwargs)` and
    passes the hidden state on unchanged, as `style` wraps it (the last one stops the forward pass)."""
    last = len(stack) - 1

    def recorder(index):
        def forward(*args, **kwargs):
            record(args, kwargs)
            if index == last:
                raise StopForward
            return style(first_tensor(args, kwargs))

        return forward

    for index, layer in enumerate(stack.layers):
        layer.forward = recorder(index)
    try:
        yield
    finally:
        for layer in stack.layers:
            del layer.forward


class SpilledStates:
    """Unit vectors of every valid token at every position, in a float32 file laid out
    (position, token, hidden), written a position at a time and read back in token chunks."""

    def __init__(self, directory: Path, positions: int, tokens: int, width: int):
        self.positions, self.tokens, self.width = positions, tokens, width
        self.row_bytes = width * 4
        self.path = directory / "unit-states.f32"
        self.file = open(self.path, "w+b")  # noqa: SIM115 (closed by close())
        self.file.truncate(positions * tokens * self.row_bytes)

    @staticmethod
    def bytes_needed(positions: int, tokens: int, width: int) -> int:
        return positions * tokens * width * 4

    def write(self, position: int, first_token: int, units: torch.Tensor) -> None:
        data = units.detach().to("cpu", torch.float32).contiguous().numpy()
        os.pwrite(self.file.fileno(), data.tobytes(), (position * self.tokens + first_token) * self.row_bytes)

    def read(self, start: int, stop: int) -> torch.Tensor:
        """(stop - start, positions, width) float32: the tokens start..stop-1 at every position."""
        out = np.empty((self.positions, stop - start, self.width), dtype=np.float32)
        for position in range(self.positions):
            offset = (position * self.tokens + start) * self.row_bytes
            view = memoryview(out[position]).cast("B")
            if os.preadv(self.file.fileno(), [view], offset) != view.nbytes:
                raise DepthcutError(f"{self.path} was truncated while the analysis ran")
        return torch.from_numpy(out).transpose(0, 1)

    def close(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


def _spill_folder(spill_dir: str | Path | None, needed: int) -> Path:
    """A fresh folder for `needed` bytes of spilled states under `spill_dir`, or a message why not."""
    root = Path(spill_dir or tempfile.gettempdir())
    if not root.is_dir():
        raise DepthcutError(f"the spill folder {root} does not exist")
    free = shutil.disk_usage(root).free
    if free < needed * 1.05:
        raise DepthcutError(
            f"the all-token metrics spill {needed / 2**30:.2f} GiB of activations to {root}, which has "
            f"{free / 2**30:.2f} GiB free; pass --spill-dir on a bigger disk, fewer --samples or a shorter "
            f"--seq-len, or leave the all-token metrics out (--metrics angular_last_token)")
    return Path(tempfile.mkdtemp(prefix="depthcut-spill-", dir=root))


def _record_layer_calls(model, stack: LayerStack, batches: list, device: torch.device, progress: bool) -> list:
    """Run every batch through the model (embeddings loaded, layers not) and return, per batch,
    the call each decoder layer received. The first batch finds how layers return their output."""
    failures = []

    def record(input_ids, attention_mask, style) -> list | None:
        """The layer calls of one batch, or None if the layers' output style is not `style`."""
        batch_calls = []
        with _recording_layers(stack, lambda args, kwargs: batch_calls.append((args, kwargs)), style):
            try:
                with torch.inference_mode():
                    model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
            except StopForward:
                pass
            except (IndexError, RuntimeError, TypeError, AttributeError) as error:
                failures.append(f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
                return None
        shape = first_tensor(*batch_calls[0]).shape
        if len(batch_calls) != len(stack) or any(first_tensor(*c).shape != shape for c in batch_calls):
            return None
        return batch_calls

    styles, calls = list(_OUTPUT_STYLES), []
    for input_ids, attention_mask in tqdm(batches, desc="embed", unit="batch", disable=not progress):
        while (batch_calls := record(input_ids, attention_mask, styles[0])) is None:
            styles.pop(0)
            if not styles:
                raise DepthcutError(f"could not replay the decoder layers of {type(model).__name__} one at a time "
                                    f"({'; '.join(failures) or 'the layers saw hidden states of changing shapes'})")
        calls.append(batch_calls)
    return calls


def stream_states(
    folder: str | Path,
    calibration,
    metrics: list,
    *,
    batch_size: int,
    dtype: torch.dtype | None,
    device: torch.device,
    layer_path: str | None = None,
    spill_dir: str | Path | None = None,
    rank: int = 0,
    world: int = 1,
    trust_remote_code: bool = False,
    offload_states: bool | None = None,
    progress: bool = True,
) -> dict:
    """Run the calibration set through the checkpoint in `folder` layer by layer, feeding `metrics`
    (instances of `depthcut.metrics.Metric`); returns facts for the analysis metadata.

    Every sample's hidden state stays on `device` between layers, unless `offload_states` (None:
    when they would take more than half the accelerator's free memory): then they wait in CPU
    memory and each batch visits the device only to go through the layer."""
    model, dtype = build_skeleton(folder, dtype, device, trust_remote_code)
    reader = CheckpointReader(folder, model)
    stack = find_layer_stack(model, layer_path)
    all_tokens = any(m.level == "all_tokens" for m in metrics)
    batches = [b for i, b in enumerate(calibration.batches(batch_size)) if i % world == rank]
    sizes = [int(mask.shape[0]) for _, mask in batches]
    token_counts = [int(mask.sum()) for _, mask in batches]
    positions = len(stack) + 1
    if offload_states is None:
        states_bytes = sum(token.numel() for token, _ in batches) * text_config(model).hidden_size * dtype.itemsize
        free = available_memory_bytes(device) if device.type != "cpu" else None
        offload_states = free is not None and states_bytes > free / 2
    parking = torch.device("cpu") if offload_states else device  # where hidden states wait between layers

    spill = None
    # Checked before any work; the file itself is made once the real width is known.
    spill_root = _spill_folder(spill_dir, SpilledStates.bytes_needed(
        positions, sum(token_counts), text_config(model).hidden_size)) if all_tokens else None

    try:
        # 1. Embeddings and the recorded layer calls.
        output_head = model.get_output_embeddings()
        skip = {id(p) for p in output_head.parameters()} if output_head is not None else set()
        skip -= {id(p) for p in model.get_input_embeddings().parameters()}  # tied: the embeddings stay
        skip |= {id(p) for p in stack.layers.parameters()}
        resident = _load_parameters(model, _parameter_keys(model, "", reader, skip), reader, dtype, device)
        calls = _record_layer_calls(model, stack, batches, device, progress)  # per batch, the L layer calls
        states = [first_tensor(*batch_calls[0]).to(parking) for batch_calls in calls]  # entering layer 0
        last_index = [last_positions(mask) for _, mask in batches]
        model.to("meta")  # the embeddings are done with
        _release_freed_memory()
        width = states[0].shape[-1]
        if spill_root is not None:
            spill = SpilledStates(spill_root, positions, sum(token_counts), width)

        last_token = torch.empty(sum(sizes), positions, width, dtype=torch.float32)
        row_starts = np.cumsum([0, *sizes])
        token_starts = np.cumsum([0, *token_counts])

        def capture(position: int, b: int, hidden: torch.Tensor) -> None:
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            _store_unit(last_token[row_starts[b] : row_starts[b + 1], position],
                        hidden[rows, last_index[b].to(hidden.device)])
            if spill is not None:
                valid = batches[b][1].reshape(-1).bool().to(hidden.device)
                units = torch.empty(int(valid.sum()), width, dtype=torch.float32, device=hidden.device)
                _store_unit(units, hidden.reshape(-1, width)[valid])
                spill.write(position, int(token_starts[b]), units)

        # 2. The layers, one resident at a time.
        for b, hidden in enumerate(states):
            capture(0, b, hidden)
        peak_layer = 0
        for index, layer in enumerate(tqdm(stack.layers, desc="layers", unit="layer", disable=not progress)):
            path = f"{stack.path}.{index}"
            peak_layer = max(peak_layer, _load_parameters(layer, _parameter_keys(layer, path, reader),
                                                          reader, dtype, device))
            with torch.inference_mode():
                for b in range(len(states)):
                    args, kwargs = _replace_hidden(*calls[b][index], states[b].to(device))
                    states[b] = output_tensor(layer(*args, **kwargs)).to(parking)
                    capture(index + 1, b, states[b])
                    _release_freed_memory()  # the batch's working set
            layer.to("meta")
            _release_freed_memory()
        del states, calls

        # 3. Cosines, with the in-memory path's shapes: (B, P, P) per batch, (K, P, P) per token chunk.
        for b in range(len(batches)):
            units = last_token[row_starts[b] : row_starts[b + 1]]
            cosines = units @ units.transpose(1, 2)
            for metric in metrics:
                if metric.level == "last_token":
                    metric.update(cosines)
        if spill is not None:
            chunk = chunk_tokens(positions, width)
            for start in tqdm(range(0, spill.tokens, chunk), desc="cosines", unit="chunk", disable=not progress):
                flat = spill.read(start, min(start + chunk, spill.tokens))
                cosines = flat @ flat.transpose(1, 2)
                for metric in metrics:
                    if metric.level == "all_tokens":
                        metric.update(cosines)
    finally:
        if spill is not None:
            spill.close()
        if spill_root is not None:
            shutil.rmtree(spill_root, ignore_errors=True)
    return {
        "layer_path": stack.path,
        "num_layers": len(stack),
        "architecture": type(model).__name__,
        "dtype": str(dtype).removeprefix("torch."),
        "streamed": {"resident_outside_layers_bytes": resident, "largest_layer_bytes": peak_layer,
                     "hidden_states_on": str(parking),
                     "spilled_bytes": 0 if spill is None else spill.bytes_needed(positions, spill.tokens, width)},
    }
