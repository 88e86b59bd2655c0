"""Writing a pruned model as a standard Hugging Face folder, with a model card and provenance."""

from __future__ import annotations

import json
from pathlib import Path

from depthcut.io.atomic import atomic_output_dir, write_json
from depthcut.io.model_files import copy_model_file, relative_file_name
from depthcut.output import environment

PROVENANCE_FILE = "depthcut.json"


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once


def model_card(provenance: dict) -> str:
    removed = provenance["removed_layers"]
    lines = [
        "---",
        "tags: [depthcut, depth-pruning]",
        "---",
        f"# {provenance['base_model']['spec']}, {len(removed)} layers removed",
        "",
        f"Made with depthcut {provenance['environment']['depthcut']} "
        f"on {provenance['environment']['created']}.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{provenance['base_model']['spec']}` |",
        f"| layers | {provenance['num_layers_before']} → {provenance['num_layers_after']} |",
        f"| removed (0-based) | {removed} |",
        f"| strategy | {provenance['strategy']} |",
    ]
    if "parameters_before" in provenance:
        lines.append(f"| parameters | {provenance['parameters_before']:,} → {provenance['parameters_after']:,} |")
    if provenance.get("block_distance") is not None:
        lines.append(f"| angular distance of the removed block | {provenance['block_distance']:.4f} |")
    if provenance.get("repair"):
        fit = provenance["repair"]
        lines.append(f"| repair (no training) | {fit['method']}: relative error at the cut {fit['relative_error_before']:.4f}"
                     f" → {fit['relative_error_after']:.4f} on {fit['data']} |")
    if provenance.get("calibration"):
        data = provenance["calibration"]
        lines.append(f"| calibration data | {data.get('source')} ({data.get('samples')} samples, {data.get('tokens')} tokens) |")
    lines += [
        "",
        ("The model is not healed (a repair, if any, was fitted without training): expect a loss increase until "
         "it is finetuned."),
        "It loads with plain transformers:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained('PATH')",
        "tokenizer = AutoTokenizer.from_pretrained('PATH')",
        "```",
        "",
        f"`{PROVENANCE_FILE}` beside this card records how it was made.",
        "",
    ]
    return "\n".join(lines)


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
    provenance = {**provenance, "environment": environment()}
    return save_model(model, tokenizer, out, provenance, model_card(provenance), force)
