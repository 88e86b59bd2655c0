"""The temporaries beside an output (`.OUT.tmp-PID-XXXXXXXX`): their names, and the removal of those
left by runs that were killed."""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
from pathlib import Path

log = logging.getLogger(__name__)


def staging_path(out: Path) -> Path:
    """A new temporary sibling of `out` that names its owner: `.OUT.tmp-PID-XXXXXXXX`."""
    return out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"


def remove_stale(folder: Path, name: str | None = None) -> list[Path]:
    """Remove the temporaries in `folder` (of the output `name`, else of any) whose owning process is
    gone, saying so on stderr; those of a live process are left alone."""
    pattern = re.compile(rf"^\.{re.escape(name) if name else '.+'}\.(?:tmp|old)-(\d+)-[0-9a-f]+$")
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if match and not _alive(int(match.group(1))):
            remove_path(Path(entry.path))
            removed.append(Path(entry.path))
            log.warning("removed %s, left behind by an earlier run that was killed (process %s is gone)",
                        entry.path, match.group(1))
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    try:  # a killed child not yet reaped is a zombie: it writes nothing any more
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return True


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


def identity(path: Path) -> tuple[int, int] | None:
    try:
        facts = os.lstat(path)
    except FileNotFoundError:
        return None
    return facts.st_dev, facts.st_ino
