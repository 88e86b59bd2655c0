"""Checks of an output path before any work: a name of its own, not over an input, not an existing
output unless replacing it was asked for, on a destination that can be written."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from depthcut.errors import DepthcutError
from depthcut.io.temporaries import staging_path


def check_no_overlap(inputs, out: str | Path) -> None:
    """Refuse, whatever --force says, an `out` that is one of the local paths `inputs` (the model, its
    data, ...), lies inside one or contains one, symlinks resolved: writing it would replace or change
    the input. Inputs that are not local paths (hub ids, `c4`, None) are passed over."""
    target = Path(out).expanduser().resolve()
    for given in inputs:
        if given is None or not Path(given).expanduser().exists():
            continue
        source = Path(given).expanduser().resolve()
        if target == source:
            relation = "is"
        elif target.is_relative_to(source):
            relation = "lies inside"
        elif source.is_relative_to(target):
            relation = "contains"
        else:
            continue
        raise DepthcutError(f"--out {out} {relation} the input {given}: writing it would replace or change that "
                            "input; choose an --out outside it")


def check_output_name(out: str | Path) -> Path:
    """`out` must name a new file or folder (not `.`, `..` or `/`) whose temporary sibling
    `.OUT.tmp-PID-XXXXXXXX` is a name the file system allows."""
    out = Path(out)
    if out.name in ("", ".", ".."):
        raise DepthcutError(f"--out {out} names no file or folder of its own (it would replace the folder it names): "
                            "give a new name, e.g. --out runs/pruned")
    longest = len(os.fsencode(staging_path(out).name))
    limit = _name_limit(out)
    if longest > limit:
        raise DepthcutError(f"--out {out}: the name is too long; depthcut writes beside it a temporary named "
                            f"{longest} bytes, more than the {limit} this file system allows: choose a shorter name")
    return out


def _name_limit(out: Path) -> int:
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    try:
        return os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def check_output_dir(out: str | Path, force: bool) -> Path:
    """Fail early, before any work, if `out` exists and may not be replaced."""
    out = check_output_name(out)
    if out.exists() and not force:
        raise DepthcutError(f"output folder {out} already exists; choose another --out or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise DepthcutError(f"output {out} exists and is not a folder")
    return out


def check_output_file(out: str | Path, force: bool) -> Path:
    """Fail early, before any work, if the file `out` exists and may not be replaced."""
    out = check_output_name(out)
    if out.is_dir():
        raise DepthcutError(f"output {out} is a folder; --out names a file here")
    if out.exists() and not force:
        raise DepthcutError(f"output file {out} already exists; choose another --out or pass --force to replace it")
    return out


def check_for_kind(out: Path, force: bool, kind: str, may_exist: bool) -> None:
    if kind == "file":
        check_output_file(out, force or may_exist)
    else:
        check_output_dir(out, force or may_exist)


def not_writable(out: Path, error: OSError) -> DepthcutError:
    where = Path(error.filename).parent if error.filename else out.parent
    reason = (error.strerror or str(error)).lower()
    return DepthcutError(f"cannot write {out}: {where} is not writable ({reason}); choose another --out")


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the disk that holds `path` (or would: its nearest existing folder); None when the
    system cannot tell. The one place depthcut asks, for outputs, spills and write errors alike."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def check_free_space(out: str | Path, needed: int, what: str = "the output") -> None:
    """Fail before any work when the disk that will hold `out` has less than `needed` bytes free."""
    parent = Path(out).absolute().parent
    free = free_bytes(parent)
    if free is not None and free < needed:
        raise DepthcutError(f"{what} needs about {needed / 2**20:,.1f} MiB, but the disk holding {parent} has "
                            f"{free / 2**20:,.1f} MiB free; free some space or choose another --out")
