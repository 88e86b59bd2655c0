"""Output folders that appear whole or not at all, and the provenance written beside them."""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from depthcut.errors import DepthcutError


def check_output_dir(out: str | Path, force: bool) -> Path:
    """Fail early, before any work, if `out` exists and may not be replaced."""
    out = Path(out)
    if out.exists() and not force:
        raise DepthcutError(f"output folder {out} already exists; choose another --out or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise DepthcutError(f"output {out} exists and is not a folder")
    return out


@contextmanager
def atomic_output_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; it replaces `out` only if the block finishes."""
    out = check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result should not be
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(trash / out.name)
        staging.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        staging.rename(out)


def check_output_file(out: str | Path, force: bool) -> Path:
    """Fail early, before any work, if the file `out` exists and may not be replaced."""
    out = Path(out)
    if out.is_dir():
        raise DepthcutError(f"output {out} is a folder; --out names a file here")
    if out.exists() and not force:
        raise DepthcutError(f"output file {out} already exists; choose another --out or pass --force to replace it")
    return out


@contextmanager
def atomic_output_file(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `out`; it becomes `out` only if the block finishes."""
    out = check_output_file(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(handle)
    staging = Path(name)
    try:
        yield staging
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    staging.chmod(0o666 & ~_umask())
    os.replace(staging, out)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def environment() -> dict:
    """Versions of what produced an output, for provenance."""
    import torch
    import transformers

    from depthcut import __version__

    return {
        "depthcut": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else None,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
