"""Checkpoints that survive a kill at any moment: written to a temporary folder, then renamed."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from depthcut.errors import DepthcutError
from depthcut.io.settings import settings_difference
from depthcut.output import atomic_output_dir, remove_stale

STATE_FILE = "state.pt"
RECIPE_FILE = "recipe.json"


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_checkpoint(folder: Path, step: int, state: dict, recipe: dict) -> Path:
    """Write `folder/step-N` atomically (depthcut.output: a temporary sibling carrying this process's
    pid, then one rename) and drop older steps: the newest complete one always exists."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:07d}"
    with atomic_output_dir(final, force=True) as staging:
        torch.save({"step": step, **state}, staging / STATE_FILE)
        (staging / RECIPE_FILE).write_text(json.dumps(recipe, indent=1, sort_keys=True))
    for older in folder.glob("step-*"):
        if older != final:
            shutil.rmtree(older, ignore_errors=True)
    remove_stale_checkpoints(folder)
    return final


def remove_stale_checkpoints(folder: Path) -> None:
    """Remove the half-written checkpoints that a killed run left in `folder` (saying so)."""
    if not folder.is_dir():
        return
    remove_stale(folder)
    for legacy in folder.glob(".tmp-*"):  # temporaries named before they carried a pid: a killed run's too
        shutil.rmtree(legacy, ignore_errors=True)


def latest_checkpoint(folder: Path) -> Path | None:
    steps = sorted(p for p in folder.glob("step-*") if (p / STATE_FILE).is_file()) if folder.is_dir() else []
    return steps[-1] if steps else None


def load_checkpoint(path: Path, recipe: dict) -> dict:
    """The saved state, after checking it belongs to a run with the same recipe."""
    saved = json.loads((path / RECIPE_FILE).read_text())
    details = settings_difference(saved, recipe)
    if details:
        raise DepthcutError(f"checkpoint {path} is from a different run ({details}); start afresh without --resume")
    return torch.load(path / STATE_FILE, weights_only=False)
