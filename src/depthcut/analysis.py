"""One forward pass over the calibration data computes every layer-similarity metric at once."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from depthcut import __version__
from depthcut.calibration import CalibrationSet, build_calibration
from depthcut.capture import ResidualCapture, StopForward
from depthcut.data import TextSource, load_texts
from depthcut.errors import DepthcutError
from depthcut.layers import find_layer_stack, text_config
from depthcut.metrics import DEFAULT_METRICS, METRICS
from depthcut.result import Analysis


def _as_calibration(data, tokenizer, samples, seq_len, mode, seed, text_field) -> CalibrationSet:
    if isinstance(data, CalibrationSet):
        return data
    if tokenizer is None:
        raise DepthcutError("a tokenizer is needed to turn text into calibration samples")
    if isinstance(data, str):
        source = load_texts(data, text_field)
    elif isinstance(data, TextSource):
        source = data
    elif isinstance(data, Sequence):
        source = TextSource(description=f"{len(data)} texts given in memory", documents=[t for t in data if t.strip()])
    else:
        raise DepthcutError(f"unsupported calibration data of type {type(data).__name__}")
    return build_calibration(tokenizer, source, samples, seq_len, mode, seed)


def _process_group(device: torch.device) -> tuple[int, int]:
    """(rank, world size) when launched with torchrun / accelerate launch, else (0, 1)."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        except (RuntimeError, ValueError) as error:
            raise DepthcutError(f"the process group did not form ({str(error).splitlines()[0]})") from None
    return dist.get_rank(), dist.get_world_size()


def _sum_across_processes(metrics, device) -> None:
    import torch.distributed as dist

    backend_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    for metric in metrics:
        for tensor in metric.state():
            total = tensor.to(backend_device)
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
            tensor.copy_(total.to(tensor.device))


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
) -> Analysis:
    """Measure how much every block of layers changes the residual stream.

    `data` is a DATA string (file, folder, ``hf:NAME``, ``c4``), a list of texts, a `TextSource`
    or a ready `CalibrationSet`. Returns an `Analysis` with the requested metrics (see
    `depthcut.metrics.METRICS`); hidden states are never kept beyond the current batch.

    Launched as several processes (`accelerate launch`, `torchrun`), each runs a share of the
    batches and the metric accumulators are summed, so every process returns the same result.
    """
    if batch_size < 1:
        raise DepthcutError("batch size must be at least 1")
    stack = find_layer_stack(model, layer_path)
    num_layers = len(stack)
    chosen = [METRICS.get(name)(num_layers) for name in metrics]
    if not chosen:
        raise DepthcutError("no metrics asked for")
    calibration = _as_calibration(data, tokenizer, samples, seq_len, mode, seed, text_field)

    device = next(model.parameters()).device
    rank, world = _process_group(device)
    capture = ResidualCapture(stack, keep_all_tokens=any(m.level == "all_tokens" for m in chosen))
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(calibration), desc="analyze", unit="sample", disable=not progress or rank != 0)
    try:
        with capture.hooks():
            for index, (input_ids, attention_mask) in enumerate(calibration.batches(batch_size)):
                if index % world != rank:  # data parallel: every process takes every world-th batch
                    bar.update(input_ids.shape[0])
                    continue
                capture.start_batch(attention_mask)  # on the CPU still: no device sync for its indices
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
                    metric.update(cosines[metric.level])
                bar.update(input_ids.shape[0])
    finally:
        bar.close()
        model.train(was_training)
    if world > 1:
        _sum_across_processes(chosen, device)

    dtype = next(model.parameters()).dtype
    metadata = _metadata(calibration, chosen, world, device, model=getattr(model.config, "_name_or_path", None)
                         or type(model).__name__, architecture=type(model).__name__, layer_path=stack.path,
                         dtype=str(dtype).removeprefix("torch."))
    return Analysis(num_layers=num_layers, metrics={m.name: m.result() for m in chosen}, metadata=metadata)


def _metadata(calibration: CalibrationSet, metrics: list, world: int, device, **facts) -> dict:
    return {
        **facts,
        "data": calibration.as_dict(),
        "samples": len(calibration),
        "tokens": calibration.num_tokens,
        "seed": calibration.seed,
        "device": str(device),
        "processes": world,
        "metric_descriptions": {m.name: m.description for m in metrics},
        "depthcut_version": __version__,
    }


def analyze_streamed(
    folder,
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
    dtype="auto",
    device="cpu",
    spill_dir=None,
    offload_states: bool | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> Analysis:
    """`analyze` for a checkpoint folder too big for memory: at most two decoder layers resident
    (the one computing, and the next, read from the shards meanwhile).

    `folder` is a local folder of safetensors shards (with its config and tokenizer). `dtype` is
    chosen as `load_model` chooses it ("auto": what `device` computes natively; "checkpoint": as
    stored). The result equals `analyze` on the model loaded in the same dtype up to float
    rounding; see `depthcut.streaming` for how, and for the disk space `angular_all_tokens` takes
    (`spill_dir`, default the temp folder).
    `offload_states` keeps the samples' hidden states in CPU memory between layers (default: when
    they would take more than half of the accelerator's free memory).
    """
    from pathlib import Path

    from depthcut.models import resolve_device
    from depthcut.precision import choose_dtype
    from depthcut.streaming import is_safetensors_folder, stream_states

    if batch_size < 1:
        raise DepthcutError("batch size must be at least 1")
    if not is_safetensors_folder(folder):
        raise DepthcutError(f"streaming needs a local folder with config.json and safetensors weights; {folder} is not "
                            "one (save the model with `model.save_pretrained(folder)` first)")
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    num_layers = getattr(text_config(config), "num_hidden_layers", None)
    if not num_layers:
        raise DepthcutError(f"{folder}/config.json gives no num_hidden_layers")
    chosen = [METRICS.get(name)(num_layers) for name in metrics]
    if not chosen:
        raise DepthcutError("no metrics asked for")
    calibration = _as_calibration(data, tokenizer, samples, seq_len, mode, seed, text_field)
    device = resolve_device(device) if not isinstance(device, torch.device) else device
    rank, world = _process_group(device)
    choice = choose_dtype(dtype, device)
    facts = stream_states(folder, calibration, chosen, batch_size=batch_size, dtype=choice.dtype,
                          device=device, layer_path=layer_path, spill_dir=spill_dir, rank=rank, world=world,
                          offload_states=offload_states,
                          trust_remote_code=trust_remote_code, progress=progress and rank == 0)
    if facts["num_layers"] != num_layers:
        raise DepthcutError(f"the layer stack holds {facts['num_layers']} layers, the config says {num_layers}")
    if world > 1:
        _sum_across_processes(chosen, device)
    metadata = _metadata(calibration, chosen, world, device, model=str(Path(folder)),
                         architecture=facts["architecture"], layer_path=facts["layer_path"], dtype=facts["dtype"],
                         streamed=facts["streamed"], dtype_choice=choice.as_dict())
    return Analysis(num_layers=num_layers, metrics={m.name: m.result() for m in chosen}, metadata=metadata)
