"""The four ways `prune_to` writes a pruned model, behind one interface: every backend takes the same
three steps, and their results fill the same provenance record (`depthcut.io.provenance`).

- `InMemory`: the model is loaded; the strategy may analyze it, a repair is folded into it, and
  transformers saves it (any dtype, any architecture depthcut can cut).
- `ShardByShard`: a local safetensors folder rewritten one tensor at a time, kept tensors copied
  byte for byte; the model is never loaded (a repair's statistics are streamed layer by layer).
- `GGUFFile`: a GGUF model written as a GGUF file, kept tensors copied in their own quantization.
- `Prepared`: a model `depthcut shrink` already cut (and repaired, and healed) as it scored it,
  written as `InMemory` writes it.

    backend = backend_for(config, source, analysis)
    removed, strategy, analysis = backend.layers()      # which layers go
    fit = backend.repair(removed)                       # the training-free repair, or None
    output = backend.write(removed, record)             # the pruned model, with record as its provenance
"""

from __future__ import annotations

import logging
from math import prod
from pathlib import Path

from depthcut.errors import DepthcutError
from depthcut.io.atomic import atomic_output_dir, write_json
from depthcut.io.model_card import PROVENANCE_FILE, prune_card
from depthcut.io.model_folder import parameter_count, save_pruned
from depthcut.io.safetensors import DTYPES, safetensors_header
from depthcut.model.gguf_surgery import gguf_plan, planned_facts, write_gguf
from depthcut.model.layers import find_layer_stack
from depthcut.model.shards import prune_shards, shard_map
from depthcut.model.skeleton import meta_skeleton
from depthcut.model.surgery import cut_config, remove_layers
from depthcut.pipeline.common import load
from depthcut.pipeline.configs import PruneConfig
from depthcut.pipeline.prune_choice import choose_layers, cut_refusal, needs_analysis
from depthcut.pipeline.prune_repair import repair_in_memory, repair_streamed

log = logging.getLogger(__name__)


class PruneBackend:
    """One way of writing a pruned model. `name` goes into the provenance as `backend`."""

    name = ""

    def __init__(self, config: PruneConfig, source, analysis):
        self.config, self.source, self.analysis = config, source, analysis
        self.num_layers = 0

    def layers(self) -> tuple[list[int], str, object]:
        """(the layers to remove, how they were chosen, the analysis used or None)."""
        raise NotImplementedError

    def repair(self, removed: list[int]) -> dict | None:
        """Fit `config.repair` for removing `removed` and keep it for `write`; what provenance records
        of it (None when no repair was asked for)."""
        raise NotImplementedError

    def write(self, removed: list[int], record: dict) -> dict:
        """Write the pruned model to `config.out` with `record` as its provenance, filled in here with
        what only this backend knows (parameters, dtype, config changes, `output`); returns the record."""
        raise NotImplementedError


class InMemory(PruneBackend):
    name = "in_memory"

    def __init__(self, config, source, analysis):
        super().__init__(config, source, analysis)
        self.model, self.tokenizer, self.source = load(config, quiet=config.quiet)
        self.num_layers = len(find_layer_stack(self.model, config.layer_path))

    def layers(self):
        config = self.config
        return choose_layers(config, self.num_layers, self.analysis, self.model, self.tokenizer, self.source,
                             refusal=cut_refusal(self.model, config))

    def repair(self, removed):
        config = self.config
        if config.repair == "none":
            return None
        kept = [i for i in range(self.num_layers) if i not in set(removed)]
        # refused before minutes of repair, not after (remove_layers checks it again)
        cut_config(self.model, self.model.config, kept, config.layer_path, config.allow_unknown_config,
                   trust_remote_code=config.trust_remote_code)
        return repair_in_memory(config, self.model, self.tokenizer, removed)

    def write(self, removed, record):
        config, model = self.config, self.model
        before = parameter_count(model)
        rewrite = remove_layers(model, removed, config.layer_path, config.allow_unknown_config)
        for note in rewrite.notes:
            log.warning(note)
        record.update(parameters_before=before, parameters_after=parameter_count(model),
                      dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
                      config_rewrite=rewrite.as_dict(), output={"format": "safetensors", "path": str(config.out)})
        save_pruned(model, self.tokenizer, config.out, record, force=config.force)
        return record


class Prepared(PruneBackend):
    """A model already cut (and repaired, and healed) in memory by `depthcut shrink`: written as
    `InMemory` writes it, with what was done to it."""

    name = "in_memory"

    def __init__(self, config, source, model, tokenizer, removed: list[int], *, num_layers: int,
                 parameters_before: int, rewrite, repair_record: dict | None):
        super().__init__(config, source, None)
        self.model, self.tokenizer, self.removed, self.num_layers = model, tokenizer, removed, num_layers
        self.parameters_before, self.rewrite, self.repair_record = parameters_before, rewrite, repair_record

    def layers(self):
        return self.removed, "shrink", None

    def repair(self, removed):
        return self.repair_record

    def write(self, removed, record):
        model = self.model
        for note in self.rewrite.notes:
            log.warning(note)
        record.update(parameters_before=self.parameters_before, parameters_after=parameter_count(model),
                      dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
                      config_rewrite=self.rewrite.as_dict(),
                      output={"format": "safetensors", "path": str(self.config.out)})
        save_pruned(model, self.tokenizer, self.config.out, record, force=self.config.force)
        return record


class StreamedRepair(PruneBackend):
    """A backend that never loads the model: a repair's statistics are gathered one layer at a time and
    the tensors its fold changes (`changed`) replace the originals as the model is written (in a GGUF,
    dequantized to F32; every other tensor is copied)."""

    changed: dict | None = None
    # (what provenance records, the changed tensors) of a repair fitted and scored already (`shrink --stream`)
    fitted: tuple[dict, dict] | None = None

    def repair(self, removed):
        if self.fitted is not None:
            record, self.changed = self.fitted
            return record
        if self.config.repair == "none":
            return None
        fit, self.changed = repair_streamed(self.config, self.source, removed)
        return fit


class ShardByShard(StreamedRepair):
    name = "shard_by_shard"

    def __init__(self, config, source, analysis):
        super().__init__(config, source, analysis)
        self.skeleton = meta_skeleton(source.location, trust_remote_code=config.trust_remote_code)
        self.num_layers = len(find_layer_stack(self.skeleton.model, config.layer_path))

    def layers(self):
        return choose_layers(self.config, self.num_layers, self.analysis,
                             refusal=cut_refusal(self.skeleton.model, self.config))

    def write(self, removed, record):
        config, folder = self.config, Path(self.source.location)
        log.info("pruning %s shard by shard (the model is never loaded) ...", folder)
        with atomic_output_dir(config.out, config.force) as staging:
            summary = prune_shards(folder, staging, removed, config.layer_path, replaced=self.changed,
                                   allow_unknown_config=config.allow_unknown_config,
                                   trust_remote_code=config.trust_remote_code)
            before = _checkpoint_parameters(folder)
            written = _checkpoint_parameters(staging)
            record.update(parameters_before=sum(before.values()), parameters_after=sum(written.values()),
                          dtype=",".join(sorted(_checkpoint_dtypes(staging))),
                          config_rewrite=summary["config_rewrite"],
                          output={"format": "safetensors", "path": str(config.out), "layer_path": summary["layer_path"],
                                  "tensor_bytes": summary["tensor_bytes"],
                                  "replaced_tensors": summary["replaced_tensors"]})
            write_json(staging / PROVENANCE_FILE, record)
            (staging / "README.md").write_text(prune_card(record, config.out), encoding="utf-8")
        for note in summary["config_rewrite"]["notes"]:
            log.warning(note)
        return record


def _checkpoint_parameters(folder: Path) -> dict[str, int]:
    """Element count of every tensor of a safetensors checkpoint, read from the headers."""
    counts = {}
    for shard in sorted(set(shard_map(folder).values())):
        header, _ = safetensors_header(folder / shard)
        counts.update({name: prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__"})
    return counts


def _checkpoint_dtypes(folder: Path) -> set[str]:
    dtypes = set()
    for shard in sorted(set(shard_map(folder).values())):
        header, _ = safetensors_header(folder / shard)
        dtypes.update(str(DTYPES[entry["dtype"]]).removeprefix("torch.")  # named as the in-memory backend names them
                      for name, entry in header.items() if name != "__metadata__" and entry["dtype"] in DTYPES)
    return dtypes


class GGUFFile(StreamedRepair):
    name = "gguf"

    def __init__(self, config, source, analysis):
        super().__init__(config, source, analysis)
        if not source.gguf_file:
            raise DepthcutError(f"--out {config.out} asks for a .gguf file, which depthcut writes only from a GGUF "
                                f"model; {config.model} is not one (prune it to a folder instead)")
        self.path = Path(source.location) / source.gguf_file
        self.gguf, _ = gguf_plan(self.path, [])
        self.num_layers = self.gguf.block_count

    def layers(self):
        config, model, tokenizer, source = self.config, None, None, self.source
        if needs_analysis(config, self.analysis):  # the model is loaded only to analyze it
            model, tokenizer, source = load(config, quiet=config.quiet)
        return choose_layers(config, self.num_layers, self.analysis, model, tokenizer, source)

    def write(self, removed, record):
        config = self.config
        model, plan = gguf_plan(self.path, removed)
        facts = planned_facts(model, plan, self.changed or {})
        log.info("pruning %s tensor by tensor (quantized tensors are copied as they are) ...", self.source.gguf_file)
        record.update(parameters_before=facts.pop("parameters_before"), parameters_after=facts.pop("parameters_after"),
                      dtype=",".join(facts["quantization"]), config_rewrite=facts.pop("config_rewrite"),
                      output={"format": "gguf", "path": str(config.out), **facts})
        written = write_gguf(model, plan, config.out, record, self.changed or {}, force=config.force)
        record["output"]["file_bytes_after"] = written  # known once written: not in the file's own copy
        return record


def backend_for(config: PruneConfig, source, analysis, gguf_out: bool, streamable: bool) -> PruneBackend:
    """The backend that writes what `config` asks for: a .gguf --out from a GGUF model, a safetensors
    folder shard by shard when nothing needs the loaded model, else the model in memory."""
    if gguf_out:
        return GGUFFile(config, source, analysis)
    if streamable:
        return ShardByShard(config, source, analysis)
    return InMemory(config, source, analysis)

