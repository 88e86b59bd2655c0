"""One forward pass over the calibration data computes every layer-similarity metric at once."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig

from depthcut import __version__
from depthcut.analysis.calibration import CalibrationSet, as_calibration
from depthcut.analysis.capture import TOKEN_POSITIONS, ResidualCapture, StopForward
from depthcut.analysis.checkpoint import is_safetensors_folder
from depthcut.analysis.result import Analysis
from depthcut.analysis.streamed import stream_states
from depthcut.errors import DepthcutError
from depthcut.metrics import DEFAULT_METRICS, METRICS
from depthcut.metrics.base import feed
from depthcut.model.distributed import rank_and_world, sum_across_processes
from depthcut.model.layer_kinds import layer_kinds
from depthcut.model.layers import find_layer_stack, text_config
from depthcut.model.loading import checked_tokenizer, resolve_device
from depthcut.model.precision import choose_dtype


def _check_arguments(batch_size: int, metrics: Sequence[str], token_positions: int | None) -> None:
    if batch_size < 1:
        raise DepthcutError("batch size must be at least 1")
    if token_positions is not None and (isinstance(token_positions, bool) or not isinstance(token_positions, int)
                                        or token_positions < 0):
        raise DepthcutError(f"token positions must be a whole number, 0 or more (0: every token), got "
                            f"{token_positions!r}")
    if not metrics:
        raise DepthcutError("no metrics asked for")
    for name in metrics:
        METRICS.get(name)  # an unknown name fails here, before any loading


@dataclass
class _Run:
    """What both entry points set up alike: the metric accumulators, the samples, this process's share."""

    metrics: list
    calibration: CalibrationSet
    rank: int
    world: int
    token_positions: int | None

    def finish(self, num_layers: int, device, **facts) -> Analysis:
        """The `Analysis`, after summing every process's accumulators (each process returns the same one)."""
        if self.world > 1:
            sum_across_processes(tensor for metric in self.metrics for tensor in metric.state())
        metadata = _metadata(self.calibration, self.metrics, self.world, device, **facts)
        metadata["metric_stderr"] = {m.name: m.stderr() for m in self.metrics if hasattr(m, "stderr")}
        metadata["metric_estimators"] = {m.name: estimator(m, self.token_positions) for m in self.metrics}
        metadata["token_positions"] = self.token_positions or None
        return Analysis(num_layers=num_layers, metrics={m.name: m.result() for m in self.metrics}, metadata=metadata)


def _set_up(num_layers: int, metrics: Sequence[str], device, data, tokenizer, samples, seq_len, mode, seed,
            text_field, token_positions) -> _Run:
    chosen = [METRICS.get(name)(num_layers) for name in metrics]
    calibration = as_calibration(data, tokenizer, samples, seq_len, mode, seed, text_field)
    rank, world = rank_and_world(device)  # launched as several: the process group forms here
    return _Run(chosen, calibration, rank, world, token_positions)


def estimator(metric, token_positions: int | None) -> str:
    """How `metric` was computed, in words, for analysis.json."""
    if metric.level == "last_token":
        return "every sequence's last non-pad token; standard error over sequences"
    if metric.consecutive_only:
        return "every non-pad token, cos(x_l, x_l+1) taken as each layer finishes"
    if not token_positions:
        return "every non-pad token; standard error over sequences (each sequence's mean one draw)"
    return (f"every non-pad token of sequences of at most {token_positions} tokens; of longer ones {token_positions} "
            "evenly spaced (the first and the last included); standard error over sequences (each sequence's "
            "mean one draw)")


@torch.inference_mode()
def analyze(
    model,
    tokenizer=None,
    data="c4",
    *,
    samples: int = 64,
    seq_len: int = 256,
    batch_size: int = 8,
    mode: str = "windows",
    seed: int = 0,
    metrics: Sequence[str] = DEFAULT_METRICS,
    layer_path: str | None = None,
    text_field: str = "text",
    progress: bool = True,
    token_positions: int | None = TOKEN_POSITIONS,
    riders: Sequence = (),
) -> Analysis:
    """Measure how much every block of layers changes the residual stream.

    `data` is a DATA string (file, folder, ``hf:NAME``, ``c4``), a list of texts, a `TextSource`
    or a ready `CalibrationSet`. Returns an `Analysis` with the requested metrics (see
    `depthcut.metrics.METRICS`); hidden states are never kept beyond the current batch.
    `token_positions`: the tokens per sequence an all-token angular distance reads (evenly spaced;
    None or 0: every one); analysis.json says how each metric was computed and its standard error.

    Launched as several processes (`accelerate launch`, `torchrun`), each runs a share of the
    batches and the metric accumulators are summed, so every process returns the same result.

    `riders` gather sums of their own from the same forward pass (`depthcut shrink`: every possible
    block's repair statistics, `repair.statistics.BlockGatherer`): each has `hooks()`, a context
    manager, and `start_batch(attention_mask)`. They see this process's batches only, so one
    process alone may carry them.
    """
    _check_arguments(batch_size, metrics, token_positions)
    stack = find_layer_stack(model, layer_path)
    num_layers = len(stack)
    device = next(model.parameters()).device
    run = _set_up(num_layers, metrics, device, data, tokenizer, samples, seq_len, mode, seed, text_field,
                  token_positions)
    chosen, calibration, rank, world = run.metrics, run.calibration, run.rank, run.world
    if riders and world > 1:
        raise DepthcutError("sums gathered alongside the analysis would hold one process's share of the samples: "
                            "run it as one process")
    capture = ResidualCapture(stack, keep_all_tokens=any(m.level == "all_tokens" and not m.consecutive_only
                                                         for m in chosen),
                              consecutive=any(m.consecutive_only for m in chosen), token_positions=token_positions)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(calibration), desc="analyze", unit="sample", disable=not progress or rank != 0)
    try:
        with ExitStack() as hooked:
            for rider in riders:  # hooked first: a hook of theirs on the last layer runs before the capture stops
                hooked.enter_context(rider.hooks())
            hooked.enter_context(capture.hooks())
            for index, (input_ids, attention_mask) in enumerate(calibration.batches(batch_size)):
                if index % world != rank:  # data parallel: every process takes every world-th batch
                    bar.update(input_ids.shape[0])
                    continue
                capture.start_batch(attention_mask)  # on the CPU still: no device sync for its indices
                for rider in riders:
                    rider.start_batch(attention_mask)
                input_ids = input_ids.to(device, non_blocking=True)
                attention_mask = attention_mask.to(device, non_blocking=True)
                try:
                    model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                except StopForward:
                    pass
                else:
                    raise RuntimeError("the last decoder layer was never called; is the layer path right?")
                cosines = capture.cosines()
                for metric in chosen:
                    if metric.consecutive_only and "consecutive" in cosines:
                        metric.update_consecutive(cosines["consecutive"])
                    else:
                        feed(metric, cosines[metric.level], cosines.get("all_token_rows")
                             if metric.level == "all_tokens" else None)
                bar.update(input_ids.shape[0])
    finally:
        bar.close()
        model.train(was_training)
    return run.finish(num_layers, device, model=getattr(model.config, "_name_or_path", None) or type(model).__name__,
                      architecture=type(model).__name__, layer_path=stack.path,
                      layer_kinds=layer_kinds(model, stack.path),
                      dtype=str(next(model.parameters()).dtype).removeprefix("torch."))


def _metadata(calibration: CalibrationSet, metrics: list, world: int, device, **facts) -> dict:
    return {
        **facts,
        "data": calibration.as_dict(),
        "samples": len(calibration),
        "tokens": calibration.num_tokens,
        "seed": calibration.seed,
        "device": str(device),
        "processes": world,
        "metric_descriptions": {m.name: METRICS.description(m.name) for m in metrics},
        "depthcut_version": __version__,
    }


def analyze_streamed(
    folder,
    tokenizer=None,
    data="c4",
    *,
    dtype="auto",
    device="cpu",
    spill_dir=None,
    offload_states: bool | None = None,
    trust_remote_code: bool = False,
    **options,
) -> Analysis:
    """`analyze` for a checkpoint folder too big for memory: at most two decoder layers resident
    (the one computing, and the next, read from the shards meanwhile).

    `folder` is a local folder of safetensors shards (with its config and tokenizer), or a .gguf
    file (dequantized a tensor at a time, as transformers loads it). `dtype` is
    chosen as `load_model` chooses it ("auto": what `device` computes natively; "checkpoint": as
    stored). The result equals `analyze` on the model loaded in the same dtype up to float
    rounding; see `depthcut.analysis.streamed` for how, and for the disk space `angular_all_tokens` takes
    (`spill_dir`, default the temp folder). `options` are `analyze`'s (samples, seq_len, batch_size,
    mode, seed, metrics, layer_path, text_field, progress), with its defaults.
    `offload_states` keeps the samples' hidden states in CPU memory between layers (default: when
    they would take more than half of the accelerator's free memory).
    """


    try:  # the options and their defaults are analyze's: written once
        bound = inspect.signature(analyze).bind(None, tokenizer, data, **options)
    except TypeError as error:
        raise TypeError(f"analyze_streamed: {error}") from None
    bound.apply_defaults()
    arguments = bound.arguments
    if arguments["riders"]:
        raise TypeError("analyze_streamed: riders need the whole model in memory (use analyze)")
    samples, seq_len, batch_size, mode, seed, metrics, layer_path, text_field, progress, token_positions = (
        arguments[name] for name in ("samples", "seq_len", "batch_size", "mode", "seed", "metrics", "layer_path",
                                     "text_field", "progress", "token_positions"))
    _check_arguments(batch_size, metrics, token_positions)
    gguf = {"gguf_file": Path(folder).name} if str(folder).lower().endswith(".gguf") and Path(folder).is_file() else {}
    if not gguf and not is_safetensors_folder(folder):
        raise DepthcutError(f"streaming needs a local folder with config.json and safetensors weights, or a .gguf "
                            f"file; {folder} is neither (save the model with `model.save_pretrained(folder)` first)")
    location = Path(folder).parent if gguf else folder
    if tokenizer is None:  # after the checks a load runs first (a GGUF's structure); a failure names the file
        tokenizer = checked_tokenizer(str(folder), trust_remote_code)

    config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code, **gguf)
    num_layers = getattr(text_config(config), "num_hidden_layers", None)
    if not num_layers:
        raise DepthcutError(f"{folder}/config.json gives no num_hidden_layers")
    device = resolve_device(device) if not isinstance(device, torch.device) else device
    run = _set_up(num_layers, metrics, device, data, tokenizer, samples, seq_len, mode, seed, text_field,
                  token_positions)
    choice = choose_dtype(dtype, device)
    facts = stream_states(folder, run.calibration, run.metrics, batch_size=batch_size, dtype=choice.dtype,
                          device=device, layer_path=layer_path, spill_dir=spill_dir, rank=run.rank, world=run.world,
                          token_positions=token_positions,
                          offload_states=offload_states, trust_remote_code=trust_remote_code,
                          progress=progress and run.rank == 0)
    if facts["num_layers"] != num_layers:
        raise DepthcutError(f"the layer stack holds {facts['num_layers']} layers, the config says {num_layers}")
    return run.finish(num_layers, device, model=str(Path(folder)), architecture=facts["architecture"],
                      layer_path=facts["layer_path"], layer_kinds=facts["layer_kinds"], dtype=facts["dtype"],
                      streamed=facts["streamed"],
                      dtype_choice=choice.as_dict())
