"""Layer-streamed analysis: a model larger than memory, one decoder layer computing at a time.

The model is built as a skeleton on the meta device (parameters without storage; buffers such as
rotary frequencies are computed for real). Then:

1. Embeddings. The parameters outside the decoder stack are read from the safetensors shards,
   except an untied output head (never needed). For every calibration batch the model's own
   forward runs with each decoder layer replaced by a recorder that keeps the layer's call
   (arguments and keywords: masks, position embeddings, ...) and passes the hidden state on, so
   the per-layer inputs are exactly what the model would give its layers. The embeddings are
   freed afterwards.
2. Layers. Layer l's weights are read from the shards, every batch's hidden state goes through
   it with the call recorded for that batch, and the weights are freed before layer l+1 runs.
   While layer l runs, a background thread reads layer l+1 (on CUDA from pinned memory, copied
   on a stream of its own), so at most two layers are resident: the one computing and the next.

The residual stream is captured at the same positions and with the same arithmetic as the
in-memory path (`depthcut.capture`: states kept in the model's dtype, upcast and normalised in
float32 when their cosines are taken), and fed to the same metric accumulators. The states at
each sequence's last token stay on the device ((samples, L+1, hidden) in the model's dtype).
Only what the chosen metrics read is kept beyond that:

- the all-token angular distance needs every token's state at every position at once, so those
  states (valid tokens only, in the model's dtype) are spilled to a file, position after position,
  by a background writer, and read back in token chunks (the next chunk read while the current
  one's cosines are taken); the disk space this takes is checked before anything runs;
- Block Influence alone reads only cos(x_l, x_l+1), which is taken as each batch leaves layer l:
  nothing is spilled;
- the last-token metrics alone spill nothing either.

On CUDA nothing in the per-batch loop waits for the device: the token indices are put on the
device once beforehand, and spilled states (and states offloaded to CPU memory) go through pinned
buffers whose copies only the threads that need them wait for.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from depthcut.capture import StopForward, last_positions, unit_cosines
from depthcut.errors import DepthcutError
from depthcut.io.safetensors import own_memory, read_tensor
from depthcut.io.skeleton import checkpoint_dtype, meta_skeleton
from depthcut.layer_kinds import layer_kinds
from depthcut.layers import LayerStack, find_layer_stack, first_tensor, output_tensor, text_config
from depthcut.shards import INDEX_FILE, SINGLE_FILE, model_names, shard_map

READ_BACK_BYTES = 16 * 2**20  # the spilled states are read back in chunks of about this size (as float32)
SPILL_QUEUE = 2  # batches' spilled states waiting for the writer thread at most


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


class CheckpointReader:
    """Tensors by name from a folder of safetensors shards, one tensor read at a time, by plain file
    reads (`depthcut.io.safetensors.read_tensor`), never through a memory map."""

    def __init__(self, folder: str | Path, model):
        self.folder = Path(folder)
        self.weight_map = shard_map(self.folder)
        names, self.converted = model_names(self.weight_map, model)
        self.keys = {name: key for key, name in names.items() if key not in self.converted}

    def key_for(self, name: str) -> str | None:
        """The checkpoint's name of the model parameter `name`."""
        return self.keys.get(name)

    def get(self, key: str, pin: bool = False) -> torch.Tensor:
        """The tensor `key`, read into memory of its own (see `own_memory`), or page-locked memory
        with `pin` (for asynchronous copies to a GPU)."""
        return read_tensor(self.folder / self.weight_map[key], key, pin=pin)


def open_checkpoint(folder: str | Path, dtype: torch.dtype | None = None, device: torch.device | None = None,
                    trust_remote_code: bool = False):
    """(the model without weights, its dtype, a reader of its tensors one at a time) for a folder of
    safetensors shards or a .gguf file (whose tensors are dequantized as they are read)."""
    if str(folder).lower().endswith(".gguf"):
        from depthcut.gguf.stream import GGUFCheckpointReader, gguf_skeleton

        model, _, dtype = gguf_skeleton(folder, dtype, device, trust_remote_code)
        return model, dtype, GGUFCheckpointReader(folder, model)
    model, _, dtype = meta_skeleton(folder, dtype, device, trust_remote_code)
    return model, dtype, CheckpointReader(folder, model)



@functools.cache
def _malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


def _release_freed_memory() -> None:
    """Hand memory freed on the heap back to the system (glibc's `malloc_trim`)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _resident_bytes() -> int | None:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class _HeapWatch:
    """Keeps the resident set of the layer loop from creeping up, without handing back memory that
    the next layer needs again.

    Weights and parked states live in memory of their own (`own_memory`); the heap serves one
    batch's working set, the same shapes at every batch and layer. Blocks of up to 32 MiB come from
    the heap once glibc has freed one that big (its mmap threshold rises to the size freed, as it
    does early in the in-memory path, while the model loads); one is made and freed here, or every
    MLP activation would be a fresh mapping, faulted in page by page. The heap then stays as it is
    after the first layer. Trimming it after every layer would hand back the working set the next
    layer faults back in (on SmolLM2-135M about a tenth of the streamed analysis's time), so it is
    trimmed only when the resident set has grown by more than `slack` bytes above the highest it
    was after the first two layers (by then the loop has reached its steady state: a layer computing,
    the next one read, the spill buffers and the parked states made).
    """

    SETTLING_LAYERS = 2

    def __init__(self):
        self.level, self.layers = 0, 0
        torch.empty(30 * 2**20, dtype=torch.uint8)  # settle: mapped for itself, freed at once

    def after_layer(self, slack: int) -> None:
        resident = _resident_bytes()
        self.layers += 1
        if resident is None:
            _release_freed_memory()
        elif self.layers <= self.SETTLING_LAYERS:
            self.level = max(self.level, resident)
        elif resident > self.level + slack:
            _release_freed_memory()


def _read_parameters(names: dict[str, str], reader: CheckpointReader, dtype: torch.dtype | None,
                     device: torch.device, stream=None) -> dict[str, torch.Tensor]:
    """The checkpoint tensors `names` (parameter name -> checkpoint key) in `dtype` on `device`.

    For a CUDA device they are read into pinned memory and copied on `stream` (a stream of the
    caller's thread's own, so the copies overlap the compute on the default stream); this thread
    waits for the copies, so the caller may use the tensors at once.
    """
    state = {}
    cuda = device.type == "cuda"
    for name, key in names.items():
        tensor = reader.get(key, pin=cuda)
        convert = dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype
        if cuda:
            with torch.cuda.stream(stream):  # converted where it is cheapest: on the GPU
                tensor = tensor.to(device, non_blocking=True)
                tensor = tensor.to(dtype) if convert else tensor
        elif convert and device.type == "cpu":  # into memory of its own too
            tensor = own_memory(tensor.numel() * dtype.itemsize).view(dtype).reshape(tensor.shape).copy_(tensor)
        else:
            tensor = (tensor.to(dtype) if convert else tensor).to(device)
        state[name] = tensor
    if cuda:
        stream.synchronize()  # waited for here, in the reader's thread: the caller can use the tensors at once
    return state


def _assign_parameters(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> int:
    """Give `module` the tensors `state` (from `_read_parameters`); returns their bytes."""
    for tensor in state.values():
        if tensor.device.type == "cuda":  # made on the reader's stream, used and freed on this one
            tensor.record_stream(torch.cuda.current_stream(tensor.device))
    module.load_state_dict(state, strict=False, assign=True)
    return sum(tensor.numel() * tensor.element_size() for tensor in state.values())


def _load_parameters(module: torch.nn.Module, names: dict[str, str], reader: CheckpointReader,
                     dtype: torch.dtype | None, device: torch.device) -> int:
    """Give `module` the checkpoint tensors `names` (parameter name in module -> checkpoint key); returns bytes."""
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    return _assign_parameters(module, _read_parameters(names, reader, dtype, device, stream))


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
    """States of every valid token at every position, in the model's dtype (as the in-memory path
    keeps them), in a file laid out (position, token, hidden): written a position of a batch at a
    time, read back in token chunks."""

    def __init__(self, directory: Path, positions: int, tokens: int, width: int, dtype: torch.dtype):
        self.positions, self.tokens, self.width, self.dtype = positions, tokens, width, dtype
        self.row_bytes = width * dtype.itemsize
        self.path = directory / "states.bin"
        self.file = open(self.path, "w+b")  # noqa: SIM115 (closed by close())
        self.file.truncate(positions * tokens * self.row_bytes)

    @staticmethod
    def bytes_needed(positions: int, tokens: int, width: int, itemsize: int) -> int:
        return positions * tokens * width * itemsize

    def write(self, position: int, first_token: int, states: torch.Tensor, ready=None) -> None:
        """Write the (tokens, width) CPU tensor `states` (once the CUDA event `ready` has passed, if given)."""
        if ready is not None:
            ready.synchronize()
        data = memoryview(states.view(torch.uint8).numpy())
        offset = (position * self.tokens + first_token) * self.row_bytes
        if os.pwrite(self.file.fileno(), data, offset) != data.nbytes:
            raise DepthcutError(f"could not write the spilled states to {self.path} (is the disk full?)")

    def read(self, start: int, stop: int, into: torch.Tensor | None = None) -> torch.Tensor:
        """(positions, stop - start, width): the tokens start..stop-1 at every position, read into
        the first columns of `into` ((positions, >= stop - start, width), reused chunk after chunk)."""
        if into is None:
            into = torch.empty(self.positions, stop - start, self.width, dtype=self.dtype)
        raw = into.view(torch.uint8).numpy()
        for position in range(self.positions):
            view = memoryview(raw[position, : stop - start]).cast("B")
            offset = (position * self.tokens + start) * self.row_bytes
            if os.preadv(self.file.fileno(), [view], offset) != view.nbytes:
                raise DepthcutError(f"{self.path} was truncated while the analysis ran")
        return into[:, : stop - start]

    def close(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


def _check_space(root: Path, needed: int) -> None:
    free = shutil.disk_usage(root).free
    if free < needed * 1.05:
        raise DepthcutError(
            f"the all-token metrics spill {needed / 2**30:.2f} GiB of activations to {root}, which has "
            f"{free / 2**30:.2f} GiB free; pass --spill-dir on a bigger disk, fewer --samples or a shorter "
            f"--seq-len, or leave the all-token angular distance out (--metrics angular_last_token,block_influence)")


def _spill_folder(spill_dir: str | Path | None, needed: int) -> Path:
    """A fresh folder for `needed` bytes of spilled states under `spill_dir`, or a message why not."""
    root = Path(spill_dir or tempfile.gettempdir())
    if not root.is_dir():
        raise DepthcutError(f"the spill folder {root} does not exist")
    _check_space(root, needed)
    return Path(tempfile.mkdtemp(prefix="depthcut-spill-", dir=root))


def _reads_consecutive_only(metric) -> bool:
    """Whether an all-token metric reads only the cosines between consecutive positions,
    cos(x_l, x_l+1) (Block Influence): those are taken as each layer runs, nothing is spilled for it."""
    from depthcut.metrics.block_influence import BlockInfluence

    return bool(getattr(metric, "consecutive_only", False)) or isinstance(metric, BlockInfluence)


def _host_buffer(shape, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """An empty CPU tensor: page-locked if asked and possible (for copies from and to a GPU that
    do not hold up the host)."""
    if pin:
        try:
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        except RuntimeError:  # no more memory can be locked: a plain buffer (copies then wait)
            pass
    return torch.empty(shape, dtype=dtype)


def _unit_rows(hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(K, H) float32 unit vectors of the flattened tokens `rows` of `hidden` (B, T, H), with
    `unit_cosines`' arithmetic (upcast, then divide by the norm)."""
    units = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows).float()
    return units.div_(torch.linalg.vector_norm(units, dim=-1, keepdim=True).clamp_min_(1e-12))


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
    observer=None,
    last_layer: int | None = None,
    progress: bool = True,
) -> dict:
    """Run the calibration set through the checkpoint in `folder` layer by layer, feeding `metrics`
    (instances of `depthcut.metrics.Metric`); returns facts for the analysis metadata. `folder` may
    also be a .gguf file, dequantized a tensor at a time (`depthcut.gguf.stream`).

    Every sample's hidden state stays on `device` between layers, unless `offload_states` (None:
    when they would take more than half the accelerator's free memory): then they wait in CPU
    memory and each batch visits the device only to go through the layer.

    `observer` (optional) sees the run: `observer.begin(model, stack, batches)` once the skeleton is
    built (it may hook the skeleton's modules: they compute with real weights while their layer is
    loaded), then `observer.after_layer(index, b, hidden)` as batch b leaves layer `index`.
    `last_layer`: stop after that layer (nothing deeper is read or computed; no metric then)."""
    model, dtype, reader = open_checkpoint(folder, dtype, device, trust_remote_code)
    stack = find_layer_stack(model, layer_path)
    layer_keys = [_parameter_keys(layer, f"{stack.path}.{index}", reader) for index, layer in enumerate(stack.layers)]
    all_token_metrics = [m for m in metrics if m.level == "all_tokens"]
    spill_needed = any(not _reads_consecutive_only(m) for m in all_token_metrics)
    batches = [b for i, b in enumerate(calibration.batches(batch_size)) if i % world == rank]
    if last_layer is not None and metrics:
        raise ValueError("metrics read every layer: stream with last_layer=None")
    if observer is not None:
        observer.begin(model, stack, batches)
    positions = len(stack) + 1
    tokens = sum(int(mask.sum()) for _, mask in batches)  # valid tokens, over all batches
    hidden_size = text_config(model).hidden_size
    if offload_states is None:
        offload_states = _states_exceed_half_the_memory(batches, hidden_size, dtype, device)
    parking = torch.device("cpu") if offload_states else device  # where hidden states wait between layers
    # Checked before any work; the file itself is made once the states' width and dtype are known.
    spill_root = None
    if spill_needed:
        spill_root = _spill_folder(spill_dir, SpilledStates.bytes_needed(positions, tokens, hidden_size, dtype.itemsize))
    spill = keeper = None
    try:
        # 1. Embeddings and the recorded layer calls.
        resident, calls, entering = _embed(model, stack, reader, batches, dtype, device, progress)
        width, state_dtype = entering[0].shape[-1], entering[0].dtype
        if spill_root is not None:
            needed = SpilledStates.bytes_needed(positions, tokens, width, state_dtype.itemsize)
            if needed > SpilledStates.bytes_needed(positions, tokens, hidden_size, dtype.itemsize):
                _check_space(spill_root, needed)  # the states came out wider than the config said
            spill = SpilledStates(spill_root, positions, tokens, width, state_dtype)
        keeper = _StateKeeper(batches, positions, width, state_dtype, device, spill,
                              consecutive=bool(all_token_metrics) and not spill_needed)
        for b, hidden in enumerate(entering):
            keeper.capture(0, b, hidden)
        states = [_park(hidden, parking) for hidden in entering]
        del entering

        # 2. The layers: one computing, the next one read meanwhile.
        peak_layer = _run_layers(stack, layer_keys, reader, dtype, device, calls, states, keeper, parking, progress,
                                 observer, len(stack) - 1 if last_layer is None else last_layer)
        del states, calls
        keeper.finish_writes()

        # 3. Cosines, with the in-memory path's arithmetic.
        if metrics:
            keeper.update(metrics, progress)
    finally:
        if keeper is not None:
            keeper.close()
        if spill is not None:
            spill.close()
        if spill_root is not None:
            shutil.rmtree(spill_root, ignore_errors=True)
    return {
        "layer_path": stack.path,
        "num_layers": len(stack),
        "layer_kinds": layer_kinds(model, stack.path),
        "architecture": type(model).__name__,
        "dtype": str(dtype).removeprefix("torch."),
        "streamed": {"resident_outside_layers_bytes": resident, "largest_layer_bytes": peak_layer,
                     "resident_layers_at_most": 2, "hidden_states_on": str(parking),
                     "spilled_bytes": 0 if spill is None else spill.bytes_needed(positions, spill.tokens, width,
                                                                                 spill.dtype.itemsize),
                     "spilled_dtype": None if spill is None else str(spill.dtype).removeprefix("torch.")},
    }


def _states_exceed_half_the_memory(batches: list, hidden_size: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether every sample's hidden state takes more than half the accelerator's free memory."""
    states_bytes = sum(token.numel() for token, _ in batches) * hidden_size * dtype.itemsize
    free = available_memory_bytes(device) if device.type != "cpu" else None
    return free is not None and states_bytes > free / 2


def _embed(model, stack: LayerStack, reader: CheckpointReader, batches: list, dtype: torch.dtype,
           device: torch.device, progress: bool) -> tuple[int, list, list]:
    """Load the parameters outside the decoder stack (but an untied output head), record every
    batch's layer calls, then free them again. Returns (their bytes, per batch the L layer calls,
    per batch the state entering layer 0)."""
    output_head = model.get_output_embeddings()
    skip = {id(p) for p in output_head.parameters()} if output_head is not None else set()
    skip -= {id(p) for p in model.get_input_embeddings().parameters()}  # tied: the embeddings stay
    skip |= {id(p) for p in stack.layers.parameters()}
    resident = _load_parameters(model, _parameter_keys(model, "", reader, skip), reader, dtype, device)
    calls = _record_layer_calls(model, stack, batches, device, progress)
    entering = [first_tensor(*batch_calls[0]) for batch_calls in calls]
    # The embeddings are done with; the layers' own buffers (OpenAI GPT's causal mask) are still to be used.
    layer_buffers = [(module, name, buffer) for module in stack.layers.modules()
                     for name, buffer in module._buffers.items() if buffer is not None]
    model.to("meta")
    for module, name, buffer in layer_buffers:
        module._buffers[name] = buffer
    _release_freed_memory()
    return resident, calls, entering


def _run_layers(stack: LayerStack, layer_keys: list[dict[str, str]], reader: CheckpointReader, dtype: torch.dtype,
                device: torch.device, calls: list, states: list, keeper: _StateKeeper, parking: torch.device,
                progress: bool, observer=None, last_layer: int | None = None) -> int:
    """Every batch through every layer, layer after layer, while a background thread reads the next
    layer's weights: at most two layers hold weights. `states` (per batch) are replaced by each
    layer's output, up to `last_layer` (default: the last). Returns the largest layer's bytes."""
    prefetch = ThreadPoolExecutor(1, thread_name_prefix="depthcut-prefetch")
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    try:
        upcoming = prefetch.submit(_read_parameters, layer_keys[0], reader, dtype, device, stream)
        peak_layer, heap = 0, _HeapWatch()
        last_layer = len(stack) - 1 if last_layer is None else last_layer
        for index, layer in enumerate(tqdm(stack.layers[: last_layer + 1], desc="layers", unit="layer",
                                           disable=not progress)):
            state, upcoming = upcoming.result(), None
            peak_layer = max(peak_layer, _assign_parameters(layer, state))
            del state
            if index < last_layer:  # at most two layers resident: this one and the next
                upcoming = prefetch.submit(_read_parameters, layer_keys[index + 1], reader, dtype, device, stream)
            _layer_step(layer, index, calls, states, keeper, parking, device, observer)
            layer.to("meta")
            heap.after_layer(slack=2 * peak_layer)
    finally:
        prefetch.shutdown(wait=True, cancel_futures=True)
    return peak_layer


def _layer_step(layer: torch.nn.Module, index: int, calls: list, states: list, keeper: _StateKeeper,
                parking: torch.device, device: torch.device, observer=None) -> None:
    """Every batch's state through `layer` (the index-th, its weights loaded), with the call recorded for that batch."""
    with torch.inference_mode():
        for b in range(len(states)):
            entered = states[b].to(device, non_blocking=True)
            args, kwargs = _replace_hidden(*calls[b][index], entered)
            hidden = output_tensor(layer(*args, **kwargs))
            keeper.capture(index + 1, b, hidden, entered)
            if observer is not None:
                observer.after_layer(index, b, hidden)
            states[b] = _park(hidden, parking, states[b])
            del entered, args, kwargs, hidden


def _park(hidden: torch.Tensor, parking: torch.device, slot: torch.Tensor | None = None) -> torch.Tensor:
    """`hidden` where the states wait between layers (`parking`), in `slot` (the batch's buffer) where
    they wait in CPU memory. The buffers are made once: from a GPU they are pinned, so the copy (after
    the copy of the previous state back to the device, on the same stream) does not hold up the host;
    on the CPU they are memory of their own, so the heap only ever holds one batch's working set, the
    same at every layer."""
    if parking.type != "cpu":
        return hidden
    if slot is None or slot.shape != hidden.shape or slot.dtype != hidden.dtype:
        if hidden.device.type == "cpu":
            slot = own_memory(hidden.numel() * hidden.element_size()).view(hidden.dtype).view(hidden.shape)
        else:
            slot = _host_buffer(hidden.shape, hidden.dtype, pin=hidden.device.type == "cuda")
    return slot.copy_(hidden, non_blocking=True)


class _StateKeeper:
    """What the metrics read of each state as it leaves a layer, and the cosines taken of it at the end.

    Always the state at each sequence's last token ((samples, L+1, hidden), on the device). With
    all-token metrics also either cos(x_l, x_l+1) of every valid token (Block Influence alone reads
    nothing else), or every valid token's state, spilled to `spill` by a background writer.
    """

    def __init__(self, batches: list, positions: int, width: int, dtype: torch.dtype, device: torch.device,
                 spill: SpilledStates | None, consecutive: bool):
        sizes = [int(mask.shape[0]) for _, mask in batches]
        self.token_counts = [int(mask.sum()) for _, mask in batches]
        self.positions, self.width, self.device, self.spill = positions, width, device, spill
        # Per batch, on the device once: the rows and positions of the last tokens, the valid tokens.
        self.last_rows = [(torch.arange(size, device=device), last_positions(mask).to(device))
                          for size, (_, mask) in zip(sizes, batches, strict=True)]
        self.valid = [mask.reshape(-1).nonzero()[:, 0].to(device) for _, mask in batches] \
            if spill is not None or consecutive else None
        self.last_token = torch.empty(sum(sizes), positions, width, dtype=dtype, device=device)
        self.consecutive = [torch.empty(count, positions - 1, dtype=torch.float32, device=device)
                            for count in self.token_counts] if consecutive else None
        self.row_starts = np.cumsum([0, *sizes])
        self.token_starts = np.cumsum([0, *self.token_counts])
        # The spilled states of a batch at one position go through a few buffers, reused: a steady
        # memory (no allocation per batch) and at most SPILL_QUEUE writes waiting.
        self.spill_buffers = [_host_buffer((max(self.token_counts), width), dtype, pin=device.type == "cuda")
                              for _ in range(SPILL_QUEUE + 1)] if spill is not None else []
        self.writing: deque = deque()  # (write in progress, its buffer), oldest first
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="depthcut-spill") if spill is not None else None

    def capture(self, position: int, b: int, hidden: torch.Tensor, entered: torch.Tensor | None = None) -> None:
        """Keep what the metrics read of the state `hidden` (B, T, H) of batch b at `position`
        (`entered`: the state that entered the layer that gave it)."""
        rows, last = self.last_rows[b]
        self.last_token[self.row_starts[b] : self.row_starts[b + 1], position].copy_(hidden[rows, last])
        if self.spill is not None:
            self._write_spill(position, b, hidden)
        if self.consecutive is not None and entered is not None:
            before, after = _unit_rows(entered, self.valid[b]), _unit_rows(hidden, self.valid[b])
            self.consecutive[b][:, position - 1] = (before * after).sum(dim=-1)

    def _write_spill(self, position: int, b: int, hidden: torch.Tensor) -> None:
        if not self.spill_buffers:  # all are being written: wait for the oldest
            done, buffer = self.writing.popleft()
            done.result()
            self.spill_buffers.append(buffer)
        buffer = self.spill_buffers.pop()
        rows, ready = buffer[: self.token_counts[b]], None
        flat = hidden.reshape(-1, self.width)
        if flat.device.type == "cpu":
            torch.index_select(flat, 0, self.valid[b], out=rows)
        else:  # to pinned memory without waiting; the writer thread waits for the copy
            rows.copy_(flat.index_select(0, self.valid[b]), non_blocking=True)
            if flat.device.type == "cuda":
                ready = torch.cuda.Event()
                ready.record(torch.cuda.current_stream(flat.device))
        self.writing.append((self.writer.submit(self.spill.write, position, int(self.token_starts[b]), rows, ready),
                             buffer))

    def finish_writes(self) -> None:
        """Wait for every spilled state to be written (raising a writer's error), and free the buffers."""
        while self.writing:
            self.writing.popleft()[0].result()
        self.spill_buffers.clear()

    def update(self, metrics: list, progress: bool) -> None:
        """Feed `metrics` the cosines of what was kept: (B, P, P) per batch, (K, P, P) per token chunk."""
        all_token_metrics = [m for m in metrics if m.level == "all_tokens"]
        for b in range(len(self.last_rows)):
            cosines = unit_cosines(self.last_token[self.row_starts[b] : self.row_starts[b + 1]])
            for metric in metrics:
                if metric.level == "last_token":
                    metric.update(cosines)
        if self.consecutive is not None:
            _consecutive_cosines(self.consecutive, self.positions, all_token_metrics, self.device)
        if self.spill is not None:
            _spilled_cosines(self.spill, all_token_metrics, self.device, progress)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.shutdown(wait=True, cancel_futures=True)


def _consecutive_cosines(consecutive: list[torch.Tensor], positions: int, metrics: list, device: torch.device) -> None:
    """Feed `metrics` the cosines cos(x_l, x_l+1) (per batch, (tokens, P-1)) as (K, P, P) matrices
    whose other entries are NaN: they read nothing else."""
    step = max(1, READ_BACK_BYTES // (positions * positions * 4))
    index = torch.arange(positions - 1, device=device)
    for values in consecutive:
        for start in range(0, len(values), step):
            part = values[start : start + step]
            cosines = torch.full((len(part), positions, positions), float("nan"), device=device)
            cosines[:, index, index + 1] = part
            for metric in metrics:
                metric.update(cosines)


def _spilled_cosines(spill: SpilledStates, metrics: list, device: torch.device, progress: bool) -> None:
    """Feed `metrics` the cosines of every spilled token, read back in chunks: the next chunk is read
    (in another thread) into one of two buffers while the other's cosines are taken."""
    cuda = device.type == "cuda"
    chunk = chunk_tokens(spill.positions, spill.width)
    starts = list(range(0, spill.tokens, chunk))
    buffers = [_host_buffer((spill.positions, chunk, spill.width), spill.dtype, pin=cuda) for _ in range(2)]
    copied = [None, None]  # CUDA: the event after which a buffer's copy to the device is done

    def read(i: int, after) -> torch.Tensor:
        if after is not None:
            after.synchronize()  # the buffer's previous chunk has reached the device
        return spill.read(starts[i], min(starts[i] + chunk, spill.tokens), into=buffers[i % 2])

    with ThreadPoolExecutor(1, thread_name_prefix="depthcut-read-back") as read_back:
        upcoming = read_back.submit(read, 0, None)
        for i in tqdm(range(len(starts)), desc="cosines", unit="chunk", disable=not progress):
            block, upcoming = upcoming.result(), None
            if i + 1 < len(starts):
                upcoming = read_back.submit(read, i + 1, copied[(i + 1) % 2])
            block = block.to(device, non_blocking=True)
            if cuda:
                copied[i % 2] = torch.cuda.Event()
                copied[i % 2].record(torch.cuda.current_stream(device))
            cosines = unit_cosines(block.transpose(0, 1))  # (tokens, P, H) -> (tokens, P, P)
            del block
            for metric in metrics:
                metric.update(cosines)
