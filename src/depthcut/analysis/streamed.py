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
in-memory path (`depthcut.analysis.capture`: states kept in the model's dtype, upcast and normalised in
float32 when their cosines are taken), and fed to the same metric accumulators. The states at
each sequence's last token stay on the device ((samples, L+1, hidden) in the model's dtype).
Only what the chosen metrics read is kept beyond that:

- the all-token angular distance needs every token's state at every position at once, so those
  states (of the tokens the in-memory path samples: `token_positions` per sequence, in the model's
  dtype) are spilled to a file, position after position, by a background writer, and read back in
  chunks of whole sequences (the next chunk read while the current one's cosines are taken); the
  disk space this takes is checked before anything runs;
- Block Influence reads only cos(x_l, x_l+1) of every token, which is taken as each batch leaves
  layer l: nothing is spilled for it;
- the last-token metrics alone spill nothing either.

On CUDA nothing in the per-batch loop waits for the device: the token indices are put on the
device once beforehand, and spilled states (and states offloaded to CPU memory) go through pinned
buffers whose copies only the threads that need them wait for.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from depthcut.analysis.capture import TOKEN_POSITIONS, StopForward, sampled_tokens
from depthcut.analysis.checkpoint import (
    CheckpointReader,
    assign_parameters,
    available_memory_bytes,
    load_parameters,
    open_checkpoint,
    parameter_keys,
    read_parameters,
)
from depthcut.analysis.spill import (
    SpilledStates,
    StateKeeper,
    check_space,
    host_buffer,
    reads_consecutive_only,
    spill_folder,
)
from depthcut.errors import DepthcutError
from depthcut.io.safetensors import own_memory
from depthcut.model.layer_kinds import layer_kinds
from depthcut.model.layers import LayerStack, find_layer_stack, first_tensor, output_tensor, text_config


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


def release_freed_memory() -> None:
    """Hand memory freed on the heap back to the system (glibc's `malloc_trim`)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _resident_bytes() -> int | None:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class HeapWatch:
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
            release_freed_memory()
        elif self.layers <= self.SETTLING_LAYERS:
            self.level = max(self.level, resident)
        elif resident > self.level + slack:
            release_freed_memory()


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


def record_layer_calls(model, stack: LayerStack, batches: list, device: torch.device, progress: bool
                       ) -> tuple[list, object]:
    """Run every batch through the model (embeddings loaded, layers not) and return (per batch, the call
    each decoder layer received; how the layers hand their hidden state back: a function of it). The first
    batch finds that style."""
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
            except (IndexError, RuntimeError, TypeError, AttributeError, ValueError) as error:
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
    return calls, styles[0]


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
    token_positions: int | None = TOKEN_POSITIONS,
) -> dict:
    """Run the calibration set through the checkpoint in `folder` layer by layer, feeding `metrics`
    (instances of `depthcut.metrics.Metric`); returns facts for the analysis metadata. `folder` may
    also be a .gguf file, dequantized a tensor at a time (`depthcut.analysis.gguf_checkpoint`).

    Every sample's hidden state stays on `device` between layers, unless `offload_states` (None:
    when they would take more than half the accelerator's free memory): then they wait in CPU
    memory and each batch visits the device only to go through the layer.

    `observer` (optional) sees the run: `observer.begin(model, stack, batches)` once the skeleton is
    built (it may hook the skeleton's modules: they compute with real weights while their layer is
    loaded), then `observer.after_layer(index, b, hidden)` as batch b leaves layer `index`.
    `last_layer`: stop after that layer (nothing deeper is read or computed; no metric then).
    `token_positions`: the tokens per sequence an all-token angular distance reads, as `analyze`'s."""
    model, dtype, reader = open_checkpoint(folder, dtype, device, trust_remote_code)
    stack = find_layer_stack(model, layer_path)
    layer_keys = [parameter_keys(layer, f"{stack.path}.{index}", reader) for index, layer in enumerate(stack.layers)]
    all_token_metrics = [m for m in metrics if m.level == "all_tokens"]
    spill_needed = any(not reads_consecutive_only(m) for m in all_token_metrics)
    batches = [b for i, b in enumerate(calibration.batches(batch_size)) if i % world == rank]
    if last_layer is not None and metrics:
        raise ValueError("metrics read every layer: stream with last_layer=None")
    if observer is not None:
        observer.begin(model, stack, batches)
    positions = len(stack) + 1
    tokens = sum(len(sampled_tokens(mask, token_positions)[0]) for _, mask in batches)  # spilled, over all batches
    hidden_size = text_config(model).hidden_size
    if offload_states is None:
        offload_states = _states_exceed_half_the_memory(batches, hidden_size, dtype, device)
    parking = torch.device("cpu") if offload_states else device  # where hidden states wait between layers
    # Checked before any work; the file itself is made once the states' width and dtype are known.
    spill_root = None
    if spill_needed:
        spill_root = spill_folder(spill_dir, SpilledStates.bytes_needed(positions, tokens, hidden_size, dtype.itemsize))
    spill = keeper = None
    try:
        # 1. Embeddings and the recorded layer calls.
        resident, calls, entering = _embed(model, stack, reader, batches, dtype, device, progress)
        width, state_dtype = entering[0].shape[-1], entering[0].dtype
        if spill_root is not None:
            needed = SpilledStates.bytes_needed(positions, tokens, width, state_dtype.itemsize)
            if needed > SpilledStates.bytes_needed(positions, tokens, hidden_size, dtype.itemsize):
                check_space(spill_root, needed)  # the states came out wider than the config said
            spill = SpilledStates(spill_root, positions, tokens, width, state_dtype)
        keeper = StateKeeper(batches, positions, width, state_dtype, device, spill,
                             consecutive=any(reads_consecutive_only(m) for m in all_token_metrics),
                             token_positions=token_positions)
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
    resident = load_parameters(model, parameter_keys(model, "", reader, skip), reader, dtype, device)
    calls, _ = record_layer_calls(model, stack, batches, device, progress)
    entering = [first_tensor(*batch_calls[0]) for batch_calls in calls]
    # The embeddings are done with; the layers' own buffers (OpenAI GPT's causal mask) are still to be used.
    layer_buffers = [(module, name, buffer) for module in stack.layers.modules()
                     for name, buffer in module._buffers.items() if buffer is not None]
    model.to("meta")
    for module, name, buffer in layer_buffers:
        module._buffers[name] = buffer
    release_freed_memory()
    return resident, calls, entering


def _run_layers(stack: LayerStack, layer_keys: list[dict[str, str]], reader: CheckpointReader, dtype: torch.dtype,
                device: torch.device, calls: list, states: list, keeper: StateKeeper, parking: torch.device,
                progress: bool, observer=None, last_layer: int | None = None) -> int:
    """Every batch through every layer, layer after layer, while a background thread reads the next
    layer's weights: at most two layers hold weights. `states` (per batch) are replaced by each
    layer's output, up to `last_layer` (default: the last). Returns the largest layer's bytes."""
    prefetch = ThreadPoolExecutor(1, thread_name_prefix="depthcut-prefetch")
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    try:
        upcoming = prefetch.submit(read_parameters, layer_keys[0], reader, dtype, device, stream)
        peak_layer, heap = 0, HeapWatch()
        last_layer = len(stack) - 1 if last_layer is None else last_layer
        for index, layer in enumerate(tqdm(stack.layers[: last_layer + 1], desc="layers", unit="layer",
                                           disable=not progress)):
            state, upcoming = upcoming.result(), None
            peak_layer = max(peak_layer, assign_parameters(layer, state))
            del state
            if index < last_layer:  # at most two layers resident: this one and the next
                upcoming = prefetch.submit(read_parameters, layer_keys[index + 1], reader, dtype, device, stream)
            _layer_step(layer, index, calls, states, keeper, parking, device, observer)
            layer.to("meta")
            heap.after_layer(slack=2 * peak_layer)
    finally:
        prefetch.shutdown(wait=True, cancel_futures=True)
    return peak_layer


def _layer_step(layer: torch.nn.Module, index: int, calls: list, states: list, keeper: StateKeeper,
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
            slot = host_buffer(hidden.shape, hidden.dtype, pin=hidden.device.type == "cuda")
    return slot.copy_(hidden, non_blocking=True)
