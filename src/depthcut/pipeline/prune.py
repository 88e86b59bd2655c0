"""`prune_to`: what `depthcut prune` writes, from Python: the chosen layers removed, saved as a
standard Hugging Face folder with a model card and provenance, in memory or shard by shard."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

from depthcut.errors import DepthcutError
from depthcut.io.atomic import check_no_overlap, claimed_for_writing
from depthcut.pipeline.common import (
    DataOptions,
    ModelOptions,
    OutputOptions,
    check_data_options,
    load,
    run_analysis,
)
from depthcut.pipeline.options import comma_list, make_config, option
from depthcut.strategies import STRATEGIES

WHAT = "what to remove"
HELDOUT_FRACTION = 0.1  # of the repair data's documents, to judge the fit on
# --out names a folder (a Hugging Face model) or a .gguf file; these endings are neither
NOT_AN_OUTPUT = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".ggml", ".json", ".onnx")


def gguf_output(out: str) -> bool:
    """Whether `--out` asks for a GGUF file (the output's format follows its name)."""
    return str(out).lower().endswith(".gguf")


def _strategy_help() -> str:
    described = "; ".join(f"{name}: {STRATEGIES.get(name).description}" for name in STRATEGIES.names())
    return f"how to choose them: {', '.join(STRATEGIES.names())} (default: angular). {described}"


@dataclass(kw_only=True)
class PruneConfig(OutputOptions, DataOptions, ModelOptions):
    drop: int | None = option(None, group=WHAT, help="number of layers to remove")
    strategy: str = option("angular", group=WHAT, help=_strategy_help(), show_default=False)
    layers: str | None = option(None, group=WHAT,
                                help="explicit 0-based layers: a half-open block 21:29, or 3,7,12")
    analysis: str | None = option(None, group=WHAT,
                                  help="an analysis.json from `depthcut analyze` (else --data is analyzed)")
    repair: str = option("none", group=WHAT, choices=("none", "lstsq", "cosine", "magnitude"),
                         help="repair the cut without training, folded into the weights (docs/repair.md): lstsq "
                              "(ReplaceMe's least-squares map into the last kept MLP), cosine (the same map fitted "
                              "to the cosine distance), magnitude (Prune&Comp's scale); fitted on --data (default c4) "
                              "with the original model (streamed one layer at a time with --stream or a .gguf --out)",
                         show_default=False)
    allow_unknown_config: tuple[str, ...] = option(
        (), group=WHAT, parse=comma_list, metavar="FIELD[,FIELD]",
        help="config fields that look as if they described layer positions but that you know do not: the cut goes "
             "on and depthcut.json records them (by default such a field stops the prune)")
    stream: bool = option(False, group=WHAT,
                          help="rewrite the safetensors shards one tensor at a time without loading the model "
                               "(automatic for a sharded folder when no analysis or repair has to run); with "
                               "--repair, its statistics are gathered one layer at a time")


@dataclass
class PruneResult:
    """What `prune_to` did: the layers removed and the provenance written beside the model."""

    out: Path
    removed: list[int]
    strategy: str
    num_layers: int
    provenance: dict

    def summary(self) -> list[str]:
        """The lines `depthcut prune` prints."""
        after = self.num_layers - len(self.removed)
        if self.provenance.get("gguf"):
            written = self.provenance["gguf"]
            size = f"{written.get('file_bytes_after', 0):,} bytes written (GGUF, quantization kept)"
            changed = written.get("sliced_keys") or []
            if changed:
                size += f"; per-layer metadata sliced: {', '.join(changed)}"
        elif self.provenance.get("streamed"):
            size = f"{self.provenance['tensor_bytes']:,} bytes of tensors written"
        else:
            size = f"{self.provenance['parameters_before']:,} -> {self.provenance['parameters_after']:,} parameters"
        return [f"removed layers {self.removed} ({self.strategy}); {self.num_layers} -> {after} layers, {size}",
                *repair_lines(self.provenance.get("repair")), f"pruned model: {self.out}"]


def repair_lines(fit: dict | None) -> list[str]:
    """What a prune says of its repair: the error at the cut before and after, on the calibration and
    the held-out text, the tensors it changed; a warning where the fit does not carry to held-out text."""
    if not fit:
        return []
    lines = [f"repair {fit['method']}: relative error at the cut {fit['relative_error_before']:.4f} -> "
             f"{fit['relative_error_after']:.4f} on {fit['tokens']:,} calibration tokens, "
             f"{fit['relative_error_heldout_before']:.4f} -> {fit['relative_error_heldout_after']:.4f} on "
             f"{fit['heldout_tokens']:,} held-out tokens"]
    if fit.get("changed_tensors"):
        lines.append(f"repair changed {len(fit['changed_tensors'])} tensor(s): {', '.join(fit['changed_tensors'][:4])}"
                     + (" ..." if len(fit["changed_tensors"]) > 4 else ""))
    if fit["relative_error_heldout_after"] >= fit["relative_error_heldout_before"]:
        lines.append("warning: on held-out text the repair does no better than plain pruning: it was fitted on too "
                     "little data for its unknowns (give more --samples or a longer --seq-len), or choose --repair none")
    return lines


def load_analysis(path: str):
    from depthcut.result import Analysis

    try:
        return Analysis.load(path)
    except UnicodeDecodeError as error:
        raise DepthcutError(f"cannot read analysis file {path}: not UTF-8 text (byte {error.start}); "
                            "is it an analysis.json?") from None


def configured_layers(config: PruneConfig, source) -> int | None:
    """The decoder layer count a local model's config gives (None when it cannot tell cheaply)."""
    if source.gguf_file or not (Path(source.location) / "config.json").is_file() or config.layer_path:
        return None
    try:
        from transformers import AutoConfig

        from depthcut.layers import text_config

        count = text_config(AutoConfig.from_pretrained(source.location,
                                                       trust_remote_code=config.trust_remote_code)).num_hidden_layers
    except Exception:  # noqa: BLE001 (the model load that follows reports what is wrong with it)
        return None
    return count if isinstance(count, int) and count > 0 else None


def _check_choice(config: PruneConfig, analysis) -> None:
    """Everything about what to remove that can be checked without the model."""
    from depthcut.strategies import check_drop

    if (config.layers is None) == (config.drop is None):
        raise DepthcutError("give either --drop N (with a --strategy) or --layers")
    if config.layers is not None and config.analysis:
        raise DepthcutError("--layers names the layers itself; it takes no --analysis")
    if config.layers is None:
        STRATEGIES.get(config.strategy)
    if config.repair != "none":
        from depthcut.repair import REPAIRS

        REPAIRS.get(config.repair)
    if str(config.out).lower().endswith(NOT_AN_OUTPUT):
        raise DepthcutError(f"--out {config.out}: depthcut writes a pruned model as a folder (a Hugging Face model) "
                            "or as one .gguf file; give a folder name or a name ending in .gguf")
    if gguf_output(config.out) and config.stream:
        raise DepthcutError("--stream is for safetensors folders; a .gguf output is always written tensor by tensor")
    check_data_options(config)
    if analysis is not None and config.drop is not None:
        check_drop(config.drop, analysis.num_layers)


def _check_against_config(config: PruneConfig, num_layers: int | None) -> None:
    """--drop and --layers checked against the configured layer count before the model loads
    (impossible values fail in a second, not after minutes of loading)."""
    from depthcut.strategies import check_drop
    from depthcut.surgery import parse_layer_spec

    if config.drop is not None:
        if num_layers is not None:
            check_drop(config.drop, num_layers)
        elif config.drop < 1:
            raise DepthcutError(f"--drop must be at least 1, got {config.drop}")
    if config.layers is not None:
        try:
            parse_layer_spec(config.layers, num_layers or sys.maxsize)
        except DepthcutError as error:
            if num_layers is not None or "out of range" not in str(error):
                raise


def _check_space(config: PruneConfig, source, num_layers: int | None) -> None:
    """A local model pruned in its stored dtype needs at least its kept layers' share of its weights."""
    from depthcut.output import check_free_space
    from depthcut.surgery import parse_layer_spec

    folder = Path(source.location)
    if config.dtype != "checkpoint" or num_layers is None or source.gguf_file or not folder.is_dir():
        return
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    removed = config.drop if config.drop is not None else len(parse_layer_spec(config.layers, num_layers))
    check_free_space(config.out, weights * (num_layers - removed) // num_layers, "the pruned model")


def needs_analysis(config: PruneConfig, analysis) -> bool:
    """Whether choosing the layers means analyzing calibration data first."""
    return config.layers is None and STRATEGIES.get(config.strategy).needs_analysis and analysis is None


def _streamable(config: PruneConfig, source, analysis) -> bool:
    """Shard-by-shard surgery needs a local safetensors folder, the stored dtype, and no analysis to run."""
    from depthcut.shards import INDEX_FILE

    local = source.gguf_file is None and Path(source.location).is_dir()
    # With a repair, --dtype is the dtype its statistics are computed in; the weights stay as stored.
    possible = (local and (config.dtype == "checkpoint" or config.repair != "none")
                and not needs_analysis(config, analysis))
    if config.stream and not possible:
        raise DepthcutError("--stream needs a local safetensors folder, --dtype auto or checkpoint (or any with "
                            "--repair), and --layers, a strategy without analysis, or --analysis FILE")
    # A repair streams only when asked: in memory its model is loaded once for statistics and surgery alike.
    return possible and (config.stream or (config.repair == "none" and (Path(source.location) / INDEX_FILE).is_file()))


def choose_layers(config: PruneConfig, num_layers: int, analysis=None, model=None, tokenizer=None, source=None,
                  refusal=None):
    """(removed layers, how they were chosen, the analysis used); analyzes `config.data` (default c4)
    on the loaded model when the strategy needs an analysis and none was given. `refusal(layers)`
    (None: every cut is allowed) says why the architecture cannot lose those layers: the strategy
    then takes its best allowed choice, and says which better ones it passed over."""
    from depthcut.strategies import check_drop, select_allowed
    from depthcut.surgery import parse_layer_spec

    if config.layers is not None:
        return parse_layer_spec(config.layers, num_layers), "explicit", None
    check_drop(config.drop, num_layers)
    if STRATEGIES.get(config.strategy).needs_analysis and analysis is None:
        data = dataclasses.replace(config, data=config.data or "c4")
        print(f"analyzing {data.data} to choose layers ...", file=sys.stderr)
        analysis = run_analysis(model, tokenizer, data, config.layer_path, progress=not config.quiet)
        analysis.metadata["model"] = source.as_dict()
    used = analysis if STRATEGIES.get(config.strategy).needs_analysis else None
    removed, skipped = select_allowed(config.strategy, config.drop, num_layers, used, config.seed,
                                      refusal or (lambda layers: None))
    if skipped:
        best, reason = skipped[0]
        print(f"note: {config.strategy} prefers removing layers {_span(best)}, which this model does not allow "
              f"({reason}); {len(skipped)} better choice(s) passed over, removing {_span(removed)}", file=sys.stderr)
    return removed, config.strategy, analysis


def _span(layers: list[int]) -> str:
    contiguous = layers == list(range(layers[0], layers[-1] + 1))
    return f"[{layers[0]}, {layers[-1] + 1})" if contiguous else str(layers)


def cut_refusal(model, config: PruneConfig):
    """`refusal(layers)` for `choose_layers`: why removing those layers from `model` (with weights or
    without) would not give an exact model, or None."""
    from depthcut.layers import find_layer_stack
    from depthcut.surgery import cut_config

    num_layers = len(find_layer_stack(model, config.layer_path))

    def refusal(layers: list[int]) -> str | None:
        kept = [i for i in range(num_layers) if i not in set(layers)]
        try:
            cut_config(model, model.config, kept, config.layer_path, config.allow_unknown_config,
                       trust_remote_code=config.trust_remote_code)
        except DepthcutError as error:
            return str(error)
        return None

    return refusal


def _block_facts(removed: list[int], analysis) -> dict:
    contiguous = removed == list(range(removed[0], removed[-1] + 1))
    metrics = analysis.metrics if analysis else {}
    return {
        "removed_block": [removed[0], removed[-1] + 1] if contiguous else None,
        "block_distance": analysis.distance(removed[0], len(removed))
        if contiguous and "angular_last_token" in metrics else None,
    }


def provenance(removed, strategy, analysis, source, num_layers, before, model, rewrite) -> dict:
    """What `depthcut.json` records about an in-memory prune."""
    from depthcut.export import parameter_count

    metrics = analysis.metrics if analysis else {}
    return {
        "base_model": source.as_dict(),
        "strategy": strategy,
        "removed_layers": removed,
        **_block_facts(removed, analysis),
        "num_layers_before": num_layers,
        "num_layers_after": num_layers - len(removed),
        "parameters_before": before,
        "parameters_after": parameter_count(model),
        "block_influence": [metrics["block_influence"][i] for i in removed] if "block_influence" in metrics else None,
        "calibration": analysis.metadata.get("data") if analysis else None,
        "analysis": analysis.to_dict() if analysis else None,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "config_rewrite": rewrite.as_dict(),
    }


def _prune_streamed(config: PruneConfig, source, analysis) -> PruneResult:
    from depthcut.export import model_card
    from depthcut.io.atomic import atomic_output_dir, write_json
    from depthcut.output import environment
    from depthcut.shards import layer_prefix, prune_shards

    from depthcut.io.skeleton import meta_skeleton

    _, num_layers, _ = layer_prefix(Path(source.location), config.layer_path)
    skeleton = meta_skeleton(source.location, trust_remote_code=config.trust_remote_code)
    removed, strategy, analysis = choose_layers(config, num_layers, analysis,
                                                refusal=cut_refusal(skeleton.model, config))
    fit, changed = _repair_streamed(config, source, removed) if config.repair != "none" else (None, None)
    print(f"pruning {source.location} shard by shard (the model is never loaded) ...", file=sys.stderr)
    with atomic_output_dir(config.out, config.force) as staging:
        summary = prune_shards(source.location, staging, removed, config.layer_path, replaced=changed,
                               allow_unknown_config=config.allow_unknown_config,
                               trust_remote_code=config.trust_remote_code)
        record = {"base_model": source.as_dict(), "strategy": strategy, **summary, "streamed": True,
                  **_block_facts(removed, analysis), "analysis": analysis.to_dict() if analysis else None,
                  "repair": fit, "environment": environment()}
        write_json(staging / "depthcut.json", record)
        (staging / "README.md").write_text(model_card(record))
    for note in summary["config_rewrite"]["notes"]:
        print(f"note: {note}", file=sys.stderr)
    return PruneResult(Path(config.out), removed, strategy, num_layers, record)


def _repair_samples(config: PruneConfig, tokenizer):
    """(calibration samples the repair is fitted on, held-out samples that judge it, the data named):
    a tenth of the documents is held out, so the fit is judged on text it never saw."""
    from depthcut.calibration import build_calibration
    from depthcut.data import load_texts
    from depthcut.healing.trainer import split_documents

    data = config.data or "c4"
    fitted_on, held_out = split_documents(load_texts(data, config.text_field), HELDOUT_FRACTION, config.seed)
    samples = {"seq_len": config.seq_len, "mode": config.sample_mode, "seed": config.seed}
    calibration = build_calibration(tokenizer, fitted_on, config.samples, **samples)
    heldout = build_calibration(tokenizer, held_out, max(1, config.samples // 4), **samples)
    return calibration, heldout, data


def _repair_record(config: PruneConfig, fit, judged, heldout, data: str) -> dict:
    """What provenance records of a repair: its fit, and its error on the held-out samples."""
    return {**fit.as_dict(), "relative_error_heldout_before": judged.error_before,
            "relative_error_heldout_after": fit.error_on(judged), "heldout_tokens": judged.tokens,
            "data": data, "samples": config.samples, "heldout_samples": heldout.input_ids.shape[0],
            "seq_len": config.seq_len, "seed": config.seed}


def _repair(config: PruneConfig, model, tokenizer, removed: list[int]) -> dict | None:
    """Fit `config.repair` on the original model's activations and fold it into its weights (before
    the layers go); what provenance records of it."""
    if config.repair == "none":
        return None
    from depthcut.repair import REPAIRS, apply_repair, fit_repair, repair_statistics

    calibration, heldout, data = _repair_samples(config, tokenizer)
    print(f"repairing the cut with {config.repair} on {data} ...", file=sys.stderr)
    options = {"layer_path": config.layer_path, "batch_size": config.batch_size, "seed": config.seed}
    fit = fit_repair(config.repair, repair_statistics(model, calibration, removed, [config.repair],
                                                      progress=not config.quiet, **options))
    judged = repair_statistics(model, heldout, removed, ["lstsq" if REPAIRS.get(config.repair).linear else "magnitude"],
                               **options)
    apply_repair(model, fit, config.layer_path)
    return _repair_record(config, fit, judged, heldout, data)


def _repair_streamed(config: PruneConfig, source, removed: list[int]) -> tuple[dict, dict]:
    """`_repair` for a model that is never loaded (a safetensors folder or a GGUF file): the
    statistics gathered layer by layer (fitted and held-out samples in one pass, stopping at the
    cut), then the changed tensors folded. Returns (what provenance records, {checkpoint tensor
    name: new value})."""
    import torch

    from depthcut.calibration import CalibrationSet
    from depthcut.models import resolve_device
    from depthcut.precision import choose_dtype
    from depthcut.repair import fit_repair
    from depthcut.repair.streamed import check_streamed_repair, folded_tensors, streamed_repair_statistics

    location = Path(source.location) / source.gguf_file if source.gguf_file else Path(source.location)
    check_streamed_repair(location, removed, config.repair, config.layer_path, config.trust_remote_code)
    tokenizer = _tokenizer_of(source, config.trust_remote_code)
    calibration, heldout, data = _repair_samples(config, tokenizer)
    width = max(calibration.input_ids.shape[1], heldout.input_ids.shape[1])

    def padded(t):
        return torch.nn.functional.pad(t, (0, width - t.shape[1]))

    both = CalibrationSet(torch.cat([padded(calibration.input_ids), padded(heldout.input_ids)]),
                          torch.cat([padded(calibration.attention_mask), padded(heldout.attention_mask)]),
                          calibration.description, calibration.mode, calibration.seed)
    device = resolve_device(config.device)
    dtype = choose_dtype(config.dtype, device)
    print(f"repairing the cut with {config.repair} on {data}, one layer at a time ({dtype.name}) ...", file=sys.stderr)
    statistics, judged = streamed_repair_statistics(
        location, both, removed, [config.repair], heldout_from=len(calibration), dtype=dtype.dtype, device=device,
        batch_size=config.batch_size, layer_path=config.layer_path, seed=config.seed,
        trust_remote_code=config.trust_remote_code, progress=not config.quiet)
    statistics.calibration = calibration.as_dict()
    fit = fit_repair(config.repair, statistics)
    changed = folded_tensors(location, fit, config.layer_path, config.trust_remote_code)
    record = {**_repair_record(config, fit, judged, heldout, data), "streamed": True, "statistics_dtype": dtype.name,
              "changed_tensors": sorted(changed)}
    return record, changed


def _tokenizer_of(source, trust_remote_code: bool):
    from transformers import AutoTokenizer

    gguf = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(source.location, trust_remote_code=trust_remote_code, **gguf)
    except Exception as error:  # transformers raises many kinds here; the user needs the one line
        where = Path(source.location) / (source.gguf_file or "")
        raise DepthcutError(f"cannot load the tokenizer of {where} to tokenize the repair's data "
                            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None


def _prune_gguf(config: PruneConfig, source, analysis) -> PruneResult:
    """A GGUF model pruned into a GGUF file: kept tensors copied byte for byte, in their own
    quantization (depthcut.gguf); the model is loaded only when an analysis has to run."""
    from depthcut.gguf.prune import gguf_block_count, prune_gguf_to
    from depthcut.output import environment

    if not source.gguf_file:
        raise DepthcutError(f"--out {config.out} asks for a .gguf file, which depthcut writes only from a GGUF model; "
                            f"{config.model} is not one (prune it to a folder instead)")
    num_layers = gguf_block_count(Path(source.location) / source.gguf_file)
    model = tokenizer = None
    if needs_analysis(config, analysis):
        model, tokenizer, source = load(config, quiet=config.quiet)
    removed, strategy, analysis = choose_layers(config, num_layers, analysis, model, tokenizer, source)
    del model
    # A repair changes a few tensors: they are written dequantized (F32), every other one is copied.
    fit, changed = _repair_streamed(config, source, removed) if config.repair != "none" else (None, None)
    print(f"pruning {source.gguf_file} tensor by tensor (quantized tensors are copied as they are) ...",
          file=sys.stderr)
    record = {"strategy": strategy, "removed_layers": removed, **_block_facts(removed, analysis),
              "num_layers_before": num_layers, "num_layers_after": num_layers - len(removed),
              "analysis": analysis.to_dict() if analysis else None, "repair": fit, "environment": environment()}
    summary = prune_gguf_to(config.model, config.out, removed, force=config.force, provenance=record,
                            replaced=changed)
    return PruneResult(Path(config.out), removed, strategy, num_layers, {**record, "gguf": summary})


def _prune_in_memory(config: PruneConfig, analysis) -> PruneResult:
    from depthcut.export import parameter_count, save_pruned
    from depthcut.layers import find_layer_stack
    from depthcut.surgery import cut_config, remove_layers

    model, tokenizer, source = load(config, quiet=config.quiet)
    num_layers = len(find_layer_stack(model, config.layer_path))
    removed, strategy, analysis = choose_layers(config, num_layers, analysis, model, tokenizer, source,
                                                refusal=cut_refusal(model, config))
    if config.repair != "none":  # refused before minutes of repair, not after (remove_layers checks it again)
        kept = [i for i in range(num_layers) if i not in set(removed)]
        cut_config(model, model.config, kept, config.layer_path, config.allow_unknown_config,
                   trust_remote_code=config.trust_remote_code)
    before = parameter_count(model)
    fit = _repair(config, model, tokenizer, removed)
    rewrite = remove_layers(model, removed, config.layer_path, config.allow_unknown_config)
    for note in rewrite.notes:
        print(f"note: {note}", file=sys.stderr)
    record = provenance(removed, strategy, analysis, source, num_layers, before, model, rewrite)
    record["repair"] = fit
    save_pruned(model, tokenizer, config.out, record, force=config.force)
    return PruneResult(Path(config.out), removed, strategy, num_layers, record)


def prune_to(config: PruneConfig | None = None, /, **fields) -> PruneResult:
    """Remove layers from a model and save it, as `depthcut prune` does.

    Takes a `PruneConfig`, or its fields: `prune_to(model="smollm2-135m", drop=8, strategy="deepest",
    out="pruned")`. Layers come from `layers` ("21:29", "3,7,12") or `drop` with a `strategy`, which
    reads `analysis` (a file) or analyzes `data`. A local safetensors folder is rewritten shard by
    shard without loading the model when nothing has to be computed (`stream`, automatic for sharded
    folders).
    """
    from depthcut.models import resolve_model

    config = make_config(PruneConfig, config, fields)
    analysis = load_analysis(config.analysis) if config.analysis else None
    _check_choice(config, analysis)
    resolve_model(config.model)  # a MODEL that is no model says so, before what --out overlaps
    check_no_overlap([config.model, config.analysis, config.data], config.out)
    with claimed_for_writing(config.out, config.force, kind="file" if gguf_output(config.out) else "dir"):
        return _prune(config, analysis)


def _prune(config: PruneConfig, analysis) -> PruneResult:
    from depthcut.models import resolve_model

    source = resolve_model(config.model)
    if gguf_output(config.out):
        return _prune_gguf(config, source, analysis)
    configured = configured_layers(config, source)
    _check_against_config(config, configured)
    if config.dtype == "auto" and not needs_analysis(config, analysis) and config.repair == "none":
        # nothing is computed, so the hardware has no say: keep the weights as stored
        config = dataclasses.replace(config, dtype="checkpoint")
    _check_space(config, source, configured)
    if _streamable(config, source, analysis):
        return _prune_streamed(config, source, analysis)
    return _prune_in_memory(config, analysis)
