"""Checkpoints that survive a kill at any moment: written to a temporary folder, then renamed.

A checkpoint `step-N/` holds `recipe.json` (the settings it belongs to) and `state.pt`: tensors and
plain values only (dicts, lists, tuples, numbers, strings), read back with
`torch.load(weights_only=True)`, so resuming never unpickles an arbitrary object:

    format     2
    step       the optimizer steps done
    adapter    {peft parameter name: tensor}: the LoRA weights
    optimizer  torch optimizer state dict; scheduler: its LR scheduler's
    rng        {"torch": uint8 tensor, "python": random.getstate() (version, tuple of ints, gauss),
                "numpy": {"kind", "key" (int64 tensor of the uint32 key), "pos", "has_gauss", "cached_gaussian"}}
    log        [{"step", "loss", "lr", "tokens", "tokens_per_s"}, ...]: every step so far ("kd" and "lm"
               too for the kd+lm objective)

The teacher of a distillation run is not in a checkpoint: the resumed run is given it again.
"""

from __future__ import annotations

import json
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from depthcut.errors import DepthcutError
from depthcut.io.atomic import atomic_output_dir
from depthcut.io.settings import settings_difference
from depthcut.io.temporaries import remove_stale

STATE_FILE = "state.pt"
RECIPE_FILE = "recipe.json"
FORMAT = 2  # 1: state.pt pickled numpy's state as an array (it needed weights_only=False)


def rng_state() -> dict:
    """The torch, python and numpy generators' states, as tensors and plain values."""
    kind, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    numpy = {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
             "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["key"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))


def save_checkpoint(folder: Path, step: int, state: dict, recipe: dict) -> Path:
    """Write `folder/step-N` atomically (depthcut.io.atomic: a temporary sibling carrying this process's
    pid, then one rename) and drop older steps: the newest complete one always exists."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:07d}"
    with atomic_output_dir(final, force=True) as staging:
        torch.save({"format": FORMAT, "step": step, **state}, staging / STATE_FILE)
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


def _damaged(path: Path, error: Exception) -> DepthcutError:
    why = getattr(error, "strerror", None) or (str(error).strip().splitlines() or [type(error).__name__])[0]
    return DepthcutError(f"checkpoint file {path} cannot be read ({why}; truncated or damaged?): start afresh with "
                         "--force instead of --resume")


def load_checkpoint(path: Path, recipe: dict) -> dict:
    """The saved state, after checking it belongs to a run with the same recipe. Only tensors and
    plain values are read: a state file holding any other object is refused, never unpickled."""
    try:
        saved = json.loads((path / RECIPE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # UnicodeDecodeError is a ValueError
        raise _damaged(path / RECIPE_FILE, error) from None
    details = settings_difference(saved, recipe)
    if details:
        raise DepthcutError(f"checkpoint {path} is from a different run ({details}); start afresh without --resume")
    try:
        state = torch.load(path / STATE_FILE, weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)", str(error))
        what = f"a pickled `{found.group(1)}`" if found else "objects other than tensors and plain values"
        raise DepthcutError(f"checkpoint {path / STATE_FILE} holds {what}: it was refused, not unpickled (a checkpoint "
                            "of an older depthcut cannot be resumed either); start afresh without --resume") from None
    except Exception as error:  # noqa: BLE001 (damaged bytes surface as any error of torch's safe unpickler:
        raise _damaged(path / STATE_FILE, error) from None  # RuntimeError on a cut file, KeyError, IndexError ...)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DepthcutError(f"checkpoint {path} is not in the format this depthcut writes; start afresh without "
                            "--resume")
    return state
