"""The files of a model folder, and the names of files taken from files: the one place that lists,
checks, opens and copies them.

A model folder's files are regular files inside it. A symlink that leaves the folder would make a
pruned or healed output carry a copy of whatever it points to (a key, a password file), so:

- `check_model_folder` (run when a MODEL folder is resolved, before anything loads) refuses a file
  that depthcut or transformers reads (config, weights, tokenizer, code, provenance) when it is a
  symlink out of the folder or not a regular file (a FIFO would hang the read);
- `model_file` / `open_model_file` give one such file, checked again as it is opened;
- `copy_extra_files` copies the other files (a README, a license, notes) into an output, skipping
  with a warning those that are symlinks out of the folder or not regular files.

Symlinks inside the folder are followed. A Hugging Face cache snapshot
(`models--ORG--NAME/snapshots/REVISION/`) is all symlinks into its repository's `blobs/`, which
counts as inside.

`plain_file_name` checks a name read from a file (a shard in a safetensors index, a GGUF split
part): a plain name of a file in the same folder, never a path that leads elsewhere.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import shutil
import stat
from pathlib import Path

from depthcut.errors import DepthcutError

log = logging.getLogger(__name__)

# Files that a load, a prune or a heal reads (transformers' config, weights, tokenizer and processor
# files, the code an auto_map names, depthcut's provenance): refused, never skipped, when unsafe.
READ_FILES = ("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json", "*.bin",
              "*.bin.index.json", "*.gguf", "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*",
              "merges.txt", "*.model", "*.tiktoken", "chat_template*", "*.jinja", "*processor_config.json",
              "*.py", "depthcut.json")


def plain_file_name(name: object, where: str | Path) -> str:
    """`name`, read from the file `where`, if it names a file in the same folder: a non-empty
    string with no path separator, not `.` or `..`, no NUL byte. Anything else is an error: a name
    like `../x.safetensors` would read or write a file outside the folder."""
    if not isinstance(name, str) or not _is_plain(name):
        raise DepthcutError(f"{where} names the file {name!r}, which is not a plain file name in its folder "
                            "(no folders, no '..', not absolute): refused")
    return name


def _is_plain(name: str) -> bool:
    separators = {"/", "\0", os.sep, os.altsep or "/"}
    return bool(name) and name not in (".", "..") and not any(s in name for s in separators)


def relative_file_name(name: str, where: str | Path) -> str:
    """`name`, read from `where`, if it names a file in that folder or below it (auto_map code may
    live in a subfolder): parts separated by `/`, each a plain name."""
    if not isinstance(name, str) or not all(_is_plain(part) for part in name.split("/")):
        raise DepthcutError(f"{where} names the file {name!r}, which leads outside its folder: refused")
    return name


def _roots(folder: Path) -> list[Path]:
    """Where the files of `folder` (resolved) may lie: in it, and for a Hugging Face cache snapshot
    in its repository's `blobs/`."""
    roots = [folder]
    if folder.parent.name == "snapshots" and (folder.parent.parent / "blobs").is_dir():
        roots.append(folder.parent.parent / "blobs")
    return roots


def _unsafe(folder: Path, path: Path) -> str | None:
    """Why the file `path` of the (resolved) model folder `folder` may not be read; None if it may."""
    try:
        if path.is_symlink():
            target = path.resolve()
            if not any(target.is_relative_to(root) for root in _roots(folder)):
                return f"is a symlink to {target}, outside the model folder"
        mode = path.stat().st_mode
    except (OSError, RuntimeError) as error:  # RuntimeError: a symlink loop
        return f"cannot be read ({getattr(error, 'strerror', None) or error})"
    if not stat.S_ISREG(mode):
        return "is not a regular file"
    return None


def is_read_file(name: str) -> bool:
    """Whether a top-level file named `name` is one that a load or a prune reads."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in READ_FILES)


def check_model_folder(folder: str | Path) -> None:
    """Refuse a model folder in which a file that depthcut or transformers reads is a symlink out of
    the folder or not a regular file (checked before anything loads)."""
    folder = Path(folder).resolve()
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if is_read_file(entry.name) and not entry.is_dir():
            why = _unsafe(folder, Path(entry.path))
            if why is not None:
                raise _refused(folder, entry.name, why)


def _refused(folder: Path, name: str, why: str) -> DepthcutError:
    return DepthcutError(f"{folder / name} {why}: depthcut reads only regular files inside the model folder "
                         "(copy the file into it instead)")


def model_file(folder: str | Path, name: str) -> Path:
    """The path of the file `name` of the model folder `folder`, after checking that it is a regular
    file inside it (a symlink out of the folder is refused)."""
    folder = Path(folder).resolve()
    path = folder / relative_file_name(name, folder)
    why = _unsafe(folder, path)
    if why is not None:
        raise _refused(folder, name, why)
    return path


def open_model_file(folder: str | Path, name: str):
    """The file `name` of the model folder `folder` opened for reading (binary), checked as it is
    opened: the path checked is the one opened, and a FIFO or device is refused, not waited on."""
    path = model_file(folder, name).resolve()
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        raise _refused(Path(folder).resolve(), name, f"cannot be read ({error.strerror})") from None
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):  # replaced between the check and the open
        os.close(descriptor)
        raise _refused(Path(folder).resolve(), name, "is not a regular file")
    os.set_blocking(descriptor, True)
    return os.fdopen(descriptor, "rb")


def read_model_text(folder: str | Path, name: str) -> str:
    """The UTF-8 text of the file `name` of the model folder `folder` (checked as `open_model_file`)."""
    with open_model_file(folder, name) as handle:
        return handle.read().decode("utf-8")


def copy_model_file(folder: str | Path, name: str, target: Path) -> None:
    """Copy the file `name` of the model folder `folder` to the new file `target`."""
    with open_model_file(folder, name) as source, open(target, "xb") as copy:
        shutil.copyfileobj(source, copy)


def copy_extra_files(folder: str | Path, target: Path, skip: set[str] | None = None,
                     skip_suffixes: tuple[str, ...] = ()) -> list[str]:
    """Copy the regular files at the top of the model folder `folder` into the folder `target`
    (tokenizer, generation config, chat template, notes), less the names in `skip` and those ending in
    `skip_suffixes`; a file that is a symlink out of the folder or not a regular file is refused if
    a load reads it, else skipped with a warning. Returns the names copied."""
    folder = Path(folder).resolve()
    copied = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        name = entry.name
        if name in (skip or set()) or name.endswith(skip_suffixes) or entry.is_dir():
            continue
        why = _unsafe(folder, Path(entry.path))
        if why is not None and is_read_file(name):
            raise _refused(folder, name, why)
        if why is not None:
            log.warning("%s was not copied: it %s", folder / name, why)
            continue
        copy_model_file(folder, name, target / name)
        copied.append(name)
    return copied
