"""Layer-major scoring: the unpruned model's predictions and every candidate cut's validation scores in one
walk over the decoder layers of a checkpoint that is never loaded whole (`depthcut shrink --stream`).

A candidate (`Trial`) computes exactly what the unpruned model does until its first changed layer:
the layer before its first gap where a repair is folded into it, else the first removed layer. So
the walk advances the unpruned stream of every window through layer i, and beside it the stream of
every candidate that has started: a candidate starts with a copy of the unpruned stream entering its
first changed layer, runs each layer it keeps (with its repair folded in, where one goes into that
layer, and taken out after) and passes the ones it removes. Each layer's weights are read once (from
the safetensors shards, or dequantized from a GGUF file a tensor at a time) for every candidate, and
freed before the next is read (`analysis.checkpoint`), while the next one is read in the background.
The layers are called as the model's own forward calls them: the calls (masks, position embeddings)
are recorded once per batch, as `analyze --stream` records them (`analysis.streamed`).

At the end the final streams go through the model's own head: its forward runs with every decoder
layer handing on what it is given and the first one replaced by the final stream, so the final
norm, the head and any logit soft-capping are the model's. The unpruned logits become the references
(`divergence.ReferenceBuilder`, spilled to disk past `reference_store.MEMORY_LIMIT`), each
candidate's are scored against them (`divergence.add_batch_scores`): the same numbers as the
in-memory scoring, up to float rounding.

The streams are the only state: per window and per candidate, tokens x hidden size in the compute
dtype. Where the candidates' streams of all windows would pass `memory_limit` bytes, the windows are
walked in groups, one walk over the layers per group."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from depthcut.analysis import checkpoint as weights  # read a tensor at a time
from depthcut.analysis.calibration import CalibrationSet
from depthcut.analysis.streamed import HeapWatch, record_layer_calls, release_freed_memory
from depthcut.evaluation.divergence import ReferenceBuilder, ReferencePredictions, WindowScores, add_batch_scores
from depthcut.evaluation.reference_store import MEMORY_LIMIT, choose_store
from depthcut.model.layers import LayerStack, find_layer_stack, first_tensor, output_tensor, replace_first_tensor
from depthcut.repair.methods import repair_folded
from depthcut.repair.reach import EMBEDDINGS, changed_layers

# The most bytes the candidates' streams may take at once (less where a quarter of the free memory is less):
# past it the windows are walked in groups, one walk each. A bound of its own, not a share of the model: the
# layer-major path is for models that do not fit, and its memory is the embeddings, a layer and the streams.
STREAMS_BYTES = 512 * 2**20


@dataclass
class Trial:
    """A candidate to score: `layers` removed, each fit of `fits` (`RepairFit`) folded in while the candidate
    runs a layer the fold changes (`repair.reach`: the layer before its block for a linear map; for a
    magnitude scale the embeddings, and so the stream from its start, and every layer before the block)."""

    layers: tuple[int, ...]
    fits: tuple = ()
    folds: dict = field(default_factory=dict)  # layer index (EMBEDDINGS too) -> the fits changing it: `reach`

    def reach(self, model, layer_path: str | None) -> None:
        self.folds = {}
        for fit in self.fits:
            for index in changed_layers(model, fit, layer_path):
                self.folds.setdefault(index, []).append(fit)

    @property
    def start(self) -> int:
        """The first layer whose computation differs from the unpruned model's."""
        return max(0, min([min(self.layers), *self.folds]))


@dataclass
class _Walk:
    """The state of one group of batches: per batch its set, its first window, its inputs and layer calls,
    and the streams (the unpruned one, and per trial one once it has started)."""

    batches: list  # (set name, first window in that set, input_ids, attention_mask)
    calls: list = field(default_factory=list)
    unpruned: list = field(default_factory=list)
    streams: dict = field(default_factory=dict)  # trial index -> per batch its stream


def stream_scores(location, sets: dict[str, CalibrationSet], trials: list[Trial], *, batch_size: int,
                  dtype: torch.dtype | None = None, device: torch.device | str = "cpu", layer_path: str | None = None,
                  trust_remote_code: bool = False, spill_dir=None, memory_limit: int | None = None,
                  progress: bool = True, description: str = "scoring"
                  ) -> tuple[dict[str, ReferencePredictions], list[dict[str, WindowScores]]]:
    """(per set, the unpruned model's predictions on its windows; per trial, its scores on every set), for
    the checkpoint at `location` (a safetensors folder or a .gguf file), walked one layer at a time (see
    the module's docstring). `memory_limit`: the bytes the trials' streams may take at once (default: a
    quarter of the free memory, at most `STREAMS_BYTES`)."""
    device = torch.device(device)
    model, dtype, reader = weights.open_checkpoint(location, dtype, device, trust_remote_code)
    stack = find_layer_stack(model, layer_path)
    for trial in trials:
        if not trial.layers or max(trial.layers) >= len(stack):
            raise ValueError(f"a trial removes layers {list(trial.layers)} of a {len(stack)}-layer model")
        trial.reach(model, layer_path)
    layer_keys = [weights.parameter_keys(layer, f"{stack.path}.{index}", reader)
                  for index, layer in enumerate(stack.layers)]
    _load_outside_layers(model, stack, reader, dtype, device)
    batches = [(name, first, input_ids, mask) for name, windows in sets.items()
               for first, (input_ids, mask) in zip(range(0, len(windows), batch_size), windows.batches(batch_size))]
    vocabulary = _vocabulary(model)
    total = sum(len(w) * (w.input_ids.shape[1] - 1) for w in sets.values()) * vocabulary * 2
    builders = {name: ReferenceBuilder(windows, choose_store(total, spill_dir, MEMORY_LIMIT))
                for name, windows in sets.items()}
    references = {name: builder.finish() for name, builder in builders.items()}  # filled as the walk ends
    scores = [{name: WindowScores([], []) for name in sets} for _ in trials]
    width = model.get_input_embeddings().weight.shape[-1]
    for group in _groups(batches, len(trials), width, dtype, device, memory_limit):
        walk = _Walk(group)
        with torch.inference_mode():
            walk.calls, style = record_layer_calls(model, stack, [(ids, mask) for _, _, ids, mask in group], device,
                                                   progress=False)
            walk.unpruned = [first_tensor(*calls[0]) for calls in walk.calls]
            for t, trial in enumerate(trials):  # a fold into the embeddings: the trial's stream starts changed
                if EMBEDDINGS in trial.folds:
                    with _folded(model, trial.folds[EMBEDDINGS], layer_path):
                        calls, _ = record_layer_calls(model, stack, [(ids, mask) for _, _, ids, mask in group],
                                                      device, progress=False)
                    walk.streams[t] = [first_tensor(*batch_calls[0]) for batch_calls in calls]
            _walk_layers(model, stack, layer_keys, reader, dtype, device, trials, walk, progress, description,
                         layer_path)
            for b, (name, first, input_ids, mask) in enumerate(group):
                builders[name].add(_logits(model, stack, style, walk.unpruned[b], input_ids, mask, device),
                                   input_ids, mask)
                for t in range(len(trials)):
                    logits = _logits(model, stack, style, walk.streams[t][b], input_ids, mask, device)
                    add_batch_scores(scores[t][name], logits, input_ids, mask, references[name], first)
        del walk
        release_freed_memory()
    model.to("meta")
    return references, scores


def _load_outside_layers(model, stack: LayerStack, reader, dtype, device) -> None:
    """The embeddings, the final norm and the head: resident for the whole walk. A head the checkpoint
    does not hold is tied to the embeddings (the skeleton is built without tying them)."""
    skip = {id(p) for p in stack.layers.parameters()}
    head = model.get_output_embeddings()
    paths = {id(module): name for name, module in model.named_modules()}
    untied = head is not None and head.weight is not model.get_input_embeddings().weight
    tie = untied and reader.key_for(f"{paths[id(head)]}.weight") is None
    if tie:
        skip.add(id(head.weight))
    weights.load_parameters(model, weights.parameter_keys(model, "", reader, skip), reader, dtype, device)
    if tie:
        head.weight = model.get_input_embeddings().weight
    model.eval()


def _vocabulary(model) -> int:
    head = model.get_output_embeddings()
    return head.weight.shape[0] if head is not None else model.get_input_embeddings().weight.shape[0]


def _groups(batches: list, trials: int, width: int, dtype: torch.dtype, device: torch.device,
            memory_limit: int | None) -> list[list]:
    """The batches in groups whose streams (the unpruned one and every trial's) fit in `memory_limit`."""
    if memory_limit is None:
        free = weights.available_memory_bytes(device)
        memory_limit = min(free // 4, STREAMS_BYTES) if free else STREAMS_BYTES
    per_batch = [ids.numel() * width * dtype.itemsize * (trials + 1) for _, _, ids, _ in batches]
    groups, current, used = [], [], 0
    for batch, size in zip(batches, per_batch, strict=True):
        if current and used + size > memory_limit:
            groups.append(current)
            current, used = [], 0
        current.append(batch)
        used += size
    return groups + ([current] if current else [])


def _walk_layers(model, stack: LayerStack, layer_keys: list, reader, dtype, device, trials: list[Trial], walk: _Walk,
                 progress: bool, description: str, layer_path: str | None) -> None:
    """Every stream of `walk` through every layer, layer after layer, while a thread reads the next layer."""
    prefetch = ThreadPoolExecutor(1, thread_name_prefix="depthcut-prefetch")
    cuda = torch.cuda.Stream(device) if device.type == "cuda" else None
    starts = {t: trial.start for t, trial in enumerate(trials)}
    try:
        upcoming = prefetch.submit(weights.read_parameters, layer_keys[0], reader, dtype, device, cuda)
        heap, peak = HeapWatch(), 0
        for index, layer in enumerate(tqdm(stack.layers, desc=description, unit="layer", disable=not progress)):
            state, upcoming = upcoming.result(), None
            peak = max(peak, weights.assign_parameters(layer, state))
            del state
            if index + 1 < len(stack):
                upcoming = prefetch.submit(weights.read_parameters, layer_keys[index + 1], reader, dtype, device, cuda)
            for t, trial in enumerate(trials):
                if starts[t] == index and t not in walk.streams:  # it starts here, as the unpruned stream enters
                    walk.streams[t] = [state.clone() for state in walk.unpruned]
                if t not in walk.streams or index in trial.layers:
                    continue
                with _folded(model, trial.folds.get(index), layer_path):
                    walk.streams[t] = _through(layer, index, walk.calls, walk.streams[t])
            walk.unpruned = _through(layer, index, walk.calls, walk.unpruned)
            layer.to("meta")
            heap.after_layer(slack=2 * peak)
    finally:
        prefetch.shutdown(wait=True, cancel_futures=True)


@contextmanager
def _folded(model, fits, layer_path: str | None):
    """`model` with `fits` (None: none) folded in, restored after."""
    with ExitStack() as stack:
        for fit in fits or ():
            stack.enter_context(repair_folded(model, fit, layer_path))
        yield


def _through(layer, index: int, calls: list, states: list) -> list:
    """Every batch's state through `layer` (the index-th, its weights loaded), with the call recorded for that batch."""
    out = []
    for b, state in enumerate(states):
        args, kwargs = replace_first_tensor(*calls[b][index], state)
        out.append(output_tensor(layer(*args, **kwargs)))
    return out


def _logits(model, stack: LayerStack, style, final: torch.Tensor, input_ids, attention_mask, device) -> torch.Tensor:
    """The model's logits for a batch whose stream leaving the last layer is `final`: its own forward, every
    decoder layer handing on what it is given but the first, which hands on `final`."""
    def hand_on(index):
        def forward(*args, **kwargs):
            return style(final if index == 0 else first_tensor(args, kwargs))
        return forward

    for index, layer in enumerate(stack.layers):
        layer.forward = hand_on(index)
    try:
        return model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False).logits
    finally:
        for layer in stack.layers:
            del layer.forward

