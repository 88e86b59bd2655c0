"""Output that appears whole or not at all, never over anything it was not asked to replace.

One mechanism serves every file and folder depthcut writes:

- a claim of OUT (`depthcut.io.claims`) is taken first, before any heavy work: a lock beside it,
  the temporaries of killed runs removed, OUT checked (`depthcut.io.output_checks`); a writer here
  takes one for its own block when none is held.
- `atomic_output_dir` / `atomic_output_file` write into a sibling `.OUT.tmp-PID-XXXXXXXX` and
  publish it with one atomic rename that fails if OUT appeared meanwhile (Linux
  `renameat2(RENAME_NOREPLACE)`, else a hard link for files or a checked rename). With `force`, an
  atomic exchange (`RENAME_EXCHANGE`) puts the new OUT in place before the old one is removed; an
  OUT that is not the one seen when the command started is never replaced. New files and folders
  follow the umask. `continued_output_dir` is the folder of a resumable command (a sweep).
- A full, read-only or failing destination is one clear `DepthcutError`, with nothing left behind.
- A signal handler that calls `depthcut.io.signals.defer_signal` does not cut a publish short: the
  signal is handled when the publish is done.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import secrets
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from depthcut.errors import DepthcutError
from depthcut.io.claims import Claim, claimed_output
from depthcut.io.output_checks import free_bytes
from depthcut.io.signals import critical
from depthcut.io.temporaries import identity, remove_path, staging_path

_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_UNSUPPORTED = (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP)
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
_WRITE_FAILED = (errno.EIO, errno.EFBIG)


# --- publishing -------------------------------------------------------------------------------

@functools.cache
def _renameat2_function():
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc before 2.28, musl
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _renameat2(source: Path, target: Path, flags: int) -> bool:
    """True when done; False when this system or file system cannot (the caller falls back)."""
    function = _renameat2_function()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(target))


def _appeared(out: Path) -> DepthcutError:
    return DepthcutError(f"{out} was created by something else while this command ran; it was left as it is and "
                         "this run's output was discarded: choose another --out")


def _publish_new(staging: Path, out: Path) -> None:
    """Move `staging` to `out` in one step that fails if `out` exists."""
    try:
        if _renameat2(staging, out, _RENAME_NOREPLACE):
            return
        if staging.is_file():
            try:
                os.link(staging, out)  # atomic and never replaces
                os.unlink(staging)
                return
            except OSError as error:
                if error.errno == errno.EEXIST:
                    raise
        if os.path.lexists(out):  # the last fallback: checked, then renamed
            raise FileExistsError(errno.EEXIST, "exists", str(out))
        os.rename(staging, out)
    except OSError as error:
        if error.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise _appeared(out) from None
        raise


def _publish_over(staging: Path, out: Path, expected: tuple[int, int]) -> None:
    """Replace `out`, which must still be what was there at the start, by `staging`: the new one is in
    place before the old one is removed."""
    current = identity(out)
    if current is None:
        return _publish_new(staging, out)
    if current != expected:
        raise DepthcutError(f"{out} was replaced by something else while this command ran; it was left as it is "
                            "and this run's output was discarded")
    if _renameat2(staging, out, _RENAME_EXCHANGE):
        if identity(staging) != expected:  # swapped by someone in between: put theirs back
            _renameat2(staging, out, _RENAME_EXCHANGE)
            raise DepthcutError(f"{out} was replaced by something else while this command ran; it was left as it "
                                "is and this run's output was discarded")
        remove_path(staging)  # now the old output
        return
    if staging.is_file():
        os.replace(staging, out)  # atomic for files
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(out, old)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(old, out)
        raise
    remove_path(old)


def _publish(staging: Path, claim: Claim) -> None:
    with critical():
        if claim.force and claim.existing is not None:
            _publish_over(staging, claim.out, claim.existing)
        else:
            _publish_new(staging, claim.out)
        claim.existing = identity(claim.out)


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    current = os.umask(0)
    os.umask(current)
    return current


def _follow_umask(root: Path) -> None:
    """Give every file and folder under `root` the mode the umask gives new files: writers that go
    through a private temporary file (safetensors weights) would otherwise leave them 0600."""
    mask = _umask()
    for folder, _, files in os.walk(root):
        os.chmod(folder, 0o777 & ~mask)
        for name in files:
            path = os.path.join(folder, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode):
                wanted = (0o777 if mode & 0o100 else 0o666) & ~mask
                if stat.S_IMODE(mode) != wanted:
                    os.chmod(path, wanted)


def _make_dir(path: Path) -> None:
    os.mkdir(path, 0o777)  # the umask applies


def _make_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies; EXCL: never a link


@contextmanager
def _staged(out: str | Path, force: bool, kind: str, make, finish=None) -> Iterator[Path]:
    """Claim `out`, make its temporary sibling with `make`, yield it, publish it when the block
    finishes; on any failure remove it and turn write errors into one clear message."""
    with claimed_output(out, force, kind) as claim:
        staging = staging_path(claim.out)
        try:
            make(staging)
        except OSError as error:
            raise _write_failure(error, claim.out) or error from None
        try:
            yield staging
            if finish is not None:
                finish(staging)
            _publish(staging, claim)
        except BaseException as error:
            failure = _write_failure(error, claim.out, staging)
            remove_path(staging)
            if failure is not None:
                raise failure from None
            raise


@contextmanager
def atomic_output_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; it becomes `out` only if the block finishes, and only
    if no one else created `out` meanwhile (with `force`, it replaces the `out` seen at the start)."""
    with _staged(out, force, "dir", _make_dir, finish=_follow_umask) as staging:
        yield staging


@contextmanager
def atomic_output_file(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `out`; it becomes `out` only if the block finishes (as above)."""
    with _staged(out, force, "file", _make_file) as staging:
        yield staging


@contextmanager
def continued_output_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """The folder a resumable command (a sweep) works in. Without `force`: `out` itself, continued if
    it exists, else created (failing if someone else creates it first). With `force` and an existing
    `out`: a new temporary sibling that replaces `out` when the block finishes."""
    with claimed_output(out, force, "dir", may_exist=True) as claim:
        if force and claim.existing is not None:
            with atomic_output_dir(out, force=True) as staging:
                yield staging
            return
        made = claim.existing is None
        if made:
            try:
                os.mkdir(claim.out, 0o777)
            except FileExistsError:
                raise _appeared(claim.out) from None
            except OSError as error:
                raise _write_failure(error, claim.out) or error from None
            claim.existing = identity(claim.out)
        try:
            yield claim.out
        except BaseException:
            if made:  # a folder this run made and that holds nothing yet goes with the failure
                with contextlib.suppress(OSError):
                    os.rmdir(claim.out)
            raise


# --- failures of the destination ----------------------------------------------------------------

def _write_failure(error: BaseException, out: Path, staging: Path | None = None) -> DepthcutError | None:
    """The error to report for an exception raised while writing `out`, when it is the destination's
    fault (full, read-only, failing); None for anything else."""
    if not isinstance(error, Exception) or isinstance(error, DepthcutError):
        return None
    code = getattr(error, "errno", None)
    text = str(error)
    if code is None and ("No space left" in text or "StorageFull" in text or "os error 28" in text):
        code = errno.ENOSPC  # libraries that wrap the OS error (safetensors, torch.save)
    if code is None and staging is not None and "write" in text.lower() and _nearly_full(staging):
        code = errno.ENOSPC
    if code in _NO_SPACE:
        return DepthcutError(f"no space left on the disk holding {out.parent} while writing {out}; nothing was "
                             "written (free some space or choose another --out)")
    if code in _NOT_WRITABLE:
        return DepthcutError(f"cannot write {out}: {os.strerror(code).lower()}; nothing was written "
                             "(choose another --out)")
    if code in _WRITE_FAILED:
        return DepthcutError(f"writing {out} failed: {os.strerror(code).lower()}; nothing was written")
    return None


def _nearly_full(path: Path) -> bool:
    free = free_bytes(path)
    return free is not None and free < 1 << 20


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")


