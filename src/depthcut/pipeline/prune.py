"""`prune_to`: what `depthcut prune` writes, from Python: the chosen layers removed, saved as a
standard Hugging Face folder with a model card and provenance, in memory or shard by shard."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

from depthcut.errors import DepthcutError
from depthcut.io.claims import claimed_for_writing
from depthcut.io.output_checks import check_no_overlap
from depthcut.pipeline.common import (
    DataOptions,
    ModelOptions,
    OutputOptions,
    check_data_options,
    load,
)
from depthcut.pipeline.options import comma_list, make_config, option
from depthcut.pipeline.prune_choice import choose_layers, cut_refusal, needs_analysis
from depthcut.pipeline.prune_repair import repair_in_memory, repair_lines, repair_streamed
from depthcut.strategies import STRATEGIES

WHAT = "what to remove"
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
    from depthcut.io.skeleton import meta_skeleton
    from depthcut.layers import find_layer_stack
    from depthcut.output import environment
    from depthcut.shards import prune_shards

    skeleton = meta_skeleton(source.location, trust_remote_code=config.trust_remote_code)
    num_layers = len(find_layer_stack(skeleton.model, config.layer_path))
    removed, strategy, analysis = choose_layers(config, num_layers, analysis,
                                                refusal=cut_refusal(skeleton.model, config))
    fit, changed = repair_streamed(config, source, removed) if config.repair != "none" else (None, None)
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
    fit, changed = repair_streamed(config, source, removed) if config.repair != "none" else (None, None)
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
    fit = repair_in_memory(config, model, tokenizer, removed)
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
