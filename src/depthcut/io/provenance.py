"""Provenance: what `depthcut.json` (and a GGUF's `depthcut.provenance` key) records about how an
output was made."""

from __future__ import annotations

import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch
import transformers

from depthcut import __version__
from depthcut.io.invocation import current_invocation


def environment() -> dict:
    """Versions of what produced an output, for provenance."""
    return {
        "depthcut": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else None,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "invocation": current_invocation(),  # what `depthcut replay` reruns (None from the Python API)
    }


PRUNE_SCHEMA = "depthcut.prune/1"
# Every key of a prune's depthcut.json, whichever backend wrote it (docs/provenance.md says what each holds).
PRUNE_KEYS = (
    "schema", "backend", "base_model", "strategy", "removed_layers", "removed_block", "block_distance",
    "block_influence", "num_layers_before", "num_layers_after", "parameters_before", "parameters_after", "dtype",
    "calibration", "analysis", "repair", "selection", "config_rewrite", "output", "environment",
)


def prune_record(backend: str, source: dict, strategy: str, removed: list[int], num_layers: int, analysis,
                 repair: dict | None, selection: dict | None = None) -> dict:
    """The provenance of a prune with every key of `PRUNE_KEYS`: what the choice and the repair
    decided is filled in here; `parameters_*`, `dtype`, `config_rewrite` and `output` by the backend
    that writes the model (None until then)."""
    contiguous = removed == list(range(removed[0], removed[-1] + 1))
    metrics = analysis.metrics if analysis is not None else {}
    record = dict.fromkeys(PRUNE_KEYS)
    record.update(
        schema=PRUNE_SCHEMA,
        backend=backend,
        base_model=source,
        strategy=strategy,
        removed_layers=removed,
        removed_block=[removed[0], removed[-1] + 1] if contiguous else None,
        block_distance=(analysis.distance(removed[0], len(removed))
                        if contiguous and "angular_last_token" in metrics else None),
        block_influence=([metrics["block_influence"][i] for i in removed] if "block_influence" in metrics else None),
        num_layers_before=num_layers,
        num_layers_after=num_layers - len(removed),
        calibration=analysis.metadata.get("data") if analysis is not None else None,
        analysis=analysis.to_dict() if analysis is not None else None,
        repair=repair,
        selection=selection,
        environment=environment(),
    )
    return record


def check_prune_record(record: dict) -> None:
    """Raise ValueError when `record` has not exactly the keys of `PRUNE_KEYS` (a backend that forgot
    one, or added its own at the top level instead of under `output`)."""
    missing, extra = set(PRUNE_KEYS) - set(record), set(record) - set(PRUNE_KEYS)
    if missing or extra:
        raise ValueError(f"prune provenance keys differ from the schema: missing {sorted(missing)}, "
                         f"extra {sorted(extra)}")
