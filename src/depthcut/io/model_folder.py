"""Writing a pruned model as a standard Hugging Face folder, with a model card and provenance."""

from __future__ import annotations

import json
from pathlib import Path

from depthcut.io.atomic import atomic_output_dir, write_json
from depthcut.io.finite import check_finite_tensors
from depthcut.io.model_card import PROVENANCE_FILE, prune_card
from depthcut.io.model_files import copy_model_file, relative_file_name
from depthcut.io.provenance import environment


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once


def save_model(model, tokenizer, out: str | Path, provenance: dict, card: str, force: bool = False,
               extra_files: dict | None = None) -> Path:
    """Save weights (safetensors), config, generation config, tokenizer, card and provenance atomically.

    `extra_files` maps a file or folder name to a function that writes it given its path.
    """
    with atomic_output_dir(out, force) as staging:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        write_json(staging / PROVENANCE_FILE, provenance)
        (staging / "README.md").write_text(card, encoding="utf-8")
        for name, writer in (extra_files or {}).items():
            writer(staging / name)
        copy_remote_code((provenance.get("base_model") or {}).get("location"), staging)
    return Path(out)


def remote_code_files(folder: Path) -> set[str]:
    """The Python files that the `auto_map` of `folder`'s config and tokenizer config name (a model
    loaded with trust_remote_code needs them beside its weights); references to other repositories
    (`repo--module.Class`) need nothing copied."""
    names = set()
    for config in ("config.json", "tokenizer_config.json"):
        try:
            auto_map = json.loads((folder / config).read_text(encoding="utf-8")).get("auto_map") or {}
        except (OSError, ValueError, AttributeError):
            continue
        for reference in auto_map.values():
            for item in reference if isinstance(reference, list) else [reference]:
                if isinstance(item, str) and "--" not in item and "." in item:
                    names.add(item.rsplit(".", 1)[0].replace(".", "/") + ".py")
    return names


def copy_remote_code(source: str | Path | None, staging: Path) -> None:
    """Copy from the model folder `source` the code files the saved configs' `auto_map` names and
    `save_pretrained` did not write (a symlink out of `source` is refused)."""
    if not source or not Path(source).is_dir():
        return
    for name in sorted(remote_code_files(staging)):
        target = staging / relative_file_name(name, Path(source) / "config.json")
        if (Path(source) / name).exists() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            copy_model_file(source, name, target)


def save_pruned(model, tokenizer, out: str | Path, provenance: dict, force: bool = False) -> Path:
    """`save_model` of a pruned model, refused before anything is written where a tensor it keeps holds
    NaN or an infinity (the original's, or made so by a cast to a narrower dtype or by a repair). The
    parameters, not the buffers: a buffer is made from the config (a mask may hold -inf by design)."""
    check_finite_tensors(model.named_parameters(), "the pruned model (as loaded in its --dtype, and repaired)")
    provenance = {**provenance, "environment": provenance.get("environment") or environment()}
    return save_model(model, tokenizer, out, provenance, prune_card(provenance, out), force)
