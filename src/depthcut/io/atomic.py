"""Output that appears whole or not at all, never over anything it was not asked to replace.

One mechanism serves every file and folder depthcut writes:

- `claim_output` runs first, before any heavy work. It takes a lock beside OUT (`.OUT.lock`, an
  `flock`), so that a second run at the same OUT fails at once; removes the temporaries of OUT left
  by runs that were killed (it says so); refuses an existing OUT without `force`; and fails at once
  on a destination it cannot write. The claim is held until `release_claims`; a writer below takes
  one for its own block when none is held.
- `atomic_output_dir` / `atomic_output_file` write into a sibling `.OUT.tmp-PID-XXXXXXXX` and
  publish it with one atomic rename that fails if OUT appeared meanwhile (Linux
  `renameat2(RENAME_NOREPLACE)`, else a hard link for files or a checked rename). With `force`, an
  atomic exchange (`RENAME_EXCHANGE`) puts the new OUT in place before the old one is removed; an
  OUT that is not the one seen when the command started is never replaced. New files and folders
  follow the umask. `continued_output_dir` is the folder of a resumable command (a sweep).
- A full, read-only or failing destination is one clear `DepthcutError`, with nothing left behind.
- A signal handler that calls `defer_signal` (`depthcut.output.handle_signals`) does not cut a
  publish short: the signal is handled when the publish is done.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import re
import secrets
import shutil
import signal
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from depthcut.errors import DepthcutError

_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_UNSUPPORTED = (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP)
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
_WRITE_FAILED = (errno.EIO, errno.EFBIG)


# --- checks -----------------------------------------------------------------------------------

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
    longest = len(os.fsencode(_staging_path(out).name))
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


def _check(out: Path, force: bool, kind: str, may_exist: bool) -> None:
    if kind == "file":
        check_output_file(out, force or may_exist)
    else:
        check_output_dir(out, force or may_exist)


# --- claims: one writer per OUT ---------------------------------------------------------------

@dataclass
class Claim:
    """This process's right to write `out`: the lock beside it, and what was there when it began."""

    out: Path
    kind: str  # "dir" or "file"
    force: bool
    existing: tuple[int, int] | None = None  # (device, inode) of OUT when claimed; None: absent
    lock_fd: int | None = None
    lock_path: Path | None = None
    made: list[Path] = field(default_factory=list)  # parent folders this claim created


_CLAIMS: dict[str, Claim] = {}


def claim_output(out: str | Path, force: bool = False, kind: str = "dir", may_exist: bool = False) -> Claim:
    """Lock `out` for this process until `release_claims`, after checking it may be written.

    `kind` is "dir" or "file"; `may_exist` lets a command continue an existing folder (a sweep).
    A second claim of the same path in this process returns the first.
    """
    out = Path(out)
    key = os.path.abspath(out)
    if key in _CLAIMS:
        return _CLAIMS[key]
    _check(out, force, kind, may_exist)  # nothing is created for a refused OUT
    claim = Claim(out, kind, force)
    _CLAIMS[key] = claim
    try:
        claim.made = _make_parents(out)
        claim.lock_fd, claim.lock_path = _lock(out)
        remove_stale(out.parent, out.name)
        _check(out, force, kind, may_exist)  # again: a run that held the lock may just have published
        claim.existing = _identity(out)
    except BaseException:
        _release(claim)
        raise
    return claim


def release_claims() -> None:
    """Release every claim this process holds: unlock, remove the lock files, and remove the parent
    folders a claim created that stayed empty (a failed command leaves nothing behind). A signal
    waits until this is done."""
    with _critical():
        for claim in list(_CLAIMS.values()):
            _release(claim)


def _release(claim: Claim) -> None:
    _CLAIMS.pop(os.path.abspath(claim.out), None)
    if claim.lock_fd is not None:
        _unlock(claim.lock_fd, claim.lock_path)
        claim.lock_fd = None
    for folder in reversed(claim.made):
        try:
            folder.rmdir()
        except OSError:
            break  # not empty: it holds the output or something else


@contextmanager
def claimed_output(out: str | Path, force: bool, kind: str, may_exist: bool = False) -> Iterator[Claim]:
    """The claim this process holds on `out`, else one taken (`claim_output`) for the block and
    released after it."""
    held = _CLAIMS.get(os.path.abspath(out))
    if held is not None:
        yield held
        return
    claim = claim_output(out, force, kind, may_exist)
    try:
        yield claim
    finally:
        _release(claim)


@contextmanager
def claimed_for_writing(out: str | Path, force: bool, kind: str = "dir", may_exist: bool = False) -> Iterator[None]:
    """`out` checked and locked for the block, before any heavy work: a second run at the same path
    fails at once. In a data-parallel launch only the first process writes, so the others only
    check the path."""
    from depthcut.distributed import is_main_process

    if not is_main_process():
        (check_output_file if kind == "file" else check_output_dir)(out, force or may_exist)
        yield
        return
    with claimed_output(out, force, kind, may_exist):
        yield


def _make_parents(out: Path) -> list[Path]:
    missing = []
    parent = out.absolute().parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    made = []
    try:
        for folder in reversed(missing):
            folder.mkdir()
            made.append(folder)
    except OSError as error:
        for folder in reversed(made):
            folder.rmdir()
        raise _not_writable(out, error) from None
    return made


def _lock(out: Path) -> tuple[int | None, Path | None]:
    """An exclusive, non-blocking flock on `.OUT.lock` beside `out`; fails at once when held."""
    import fcntl

    path = out.parent / f".{out.name}.lock"
    while True:
        fd = _open_lock(path, out)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_pid(fd)
            os.close(fd)
            who = f" (process {owner})" if owner else ""
            raise DepthcutError(f"another depthcut run{who} is writing {out}; wait for it to finish or choose "
                                "another --out") from None
        except OSError as error:  # a file system without locks (some network ones): go on unlocked
            os.close(fd)
            if error.errno not in (errno.ENOLCK, *_UNSUPPORTED):
                raise
            return None, None
        # The holder before us may have removed the file between our open and our lock: retry then.
        try:
            current = os.lstat(path)
            locked = os.fstat(fd)
            if (current.st_dev, current.st_ino) == (locked.st_dev, locked.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:  # the owner's pid, for the message of a second run; the lock itself does not need it
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError:
        pass
    return fd, path


def _open_lock(path: Path, out: Path) -> int:
    """The lock file opened, never through a symlink, and only if it is a plain file of its own: the
    pid written into it must not land in a file of the user's that something linked there."""
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK  # NONBLOCK: a FIFO never hangs
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise _bad_lock(path, out, "is a symlink") from None
        raise _not_writable(out, error) from None
    facts = os.fstat(fd)
    if not stat.S_ISREG(facts.st_mode) or facts.st_nlink > 1:
        os.close(fd)
        raise _bad_lock(path, out, "is not a regular file" if not stat.S_ISREG(facts.st_mode) else
                        "has other names (hard links)")
    return fd


def _bad_lock(path: Path, out: Path, why: str) -> DepthcutError:
    return DepthcutError(f"the lock file {path} of {out} {why}; depthcut writes only a lock file of its own there: "
                         "remove it and run again")


def _unlock(fd: int, path: Path | None) -> None:
    try:
        current, locked = os.lstat(path), os.fstat(fd)
        if (current.st_dev, current.st_ino) == (locked.st_dev, locked.st_ino):
            os.unlink(path)  # removed while still locked, so no other run can lock the removed file unseen
    except (OSError, TypeError):
        pass
    os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


# --- temporaries ------------------------------------------------------------------------------

def _staging_path(out: Path) -> Path:
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
            _remove(Path(entry.path))
            removed.append(Path(entry.path))
            print(f"depthcut: removed {entry.path}, left behind by an earlier run that was killed "
                  f"(process {match.group(1)} is gone)", file=sys.stderr)
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


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        facts = os.lstat(path)
    except FileNotFoundError:
        return None
    return facts.st_dev, facts.st_ino


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
    current = _identity(out)
    if current is None:
        return _publish_new(staging, out)
    if current != expected:
        raise DepthcutError(f"{out} was replaced by something else while this command ran; it was left as it is "
                            "and this run's output was discarded")
    if _renameat2(staging, out, _RENAME_EXCHANGE):
        if _identity(staging) != expected:  # swapped by someone in between: put theirs back
            _renameat2(staging, out, _RENAME_EXCHANGE)
            raise DepthcutError(f"{out} was replaced by something else while this command ran; it was left as it "
                                "is and this run's output was discarded")
        _remove(staging)  # now the old output
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
    _remove(old)


def _publish(staging: Path, claim: Claim) -> None:
    with _critical():
        if claim.force and claim.existing is not None:
            _publish_over(staging, claim.out, claim.existing)
        else:
            _publish_new(staging, claim.out)
        claim.existing = _identity(claim.out)


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
        staging = _staging_path(claim.out)
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
            _remove(staging)
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
            claim.existing = _identity(claim.out)
        try:
            yield claim.out
        except BaseException:
            if made:  # a folder this run made and that holds nothing yet goes with the failure
                with contextlib.suppress(OSError):
                    os.rmdir(claim.out)
            raise


# --- failures of the destination ----------------------------------------------------------------

def _not_writable(out: Path, error: OSError) -> DepthcutError:
    where = Path(error.filename).parent if error.filename else out.parent
    reason = (error.strerror or str(error)).lower()
    return DepthcutError(f"cannot write {out}: {where} is not writable ({reason}); choose another --out")


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
    try:
        return shutil.disk_usage(path if path.exists() else path.parent).free < 1 << 20
    except OSError:
        return False


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")


# --- signals during a publish -------------------------------------------------------------------

class _Publishing:
    depth = 0  # > 0 while publishing or releasing claims
    pending: int | None = None  # a signal that arrived meanwhile, handled when the last one ends


_PUBLISHING = _Publishing()


def defer_signal(signum: int) -> bool:
    """For a signal handler: True when a publish is in progress, and the signal is then handled (by
    the handler installed for it) as soon as the publish is done; False otherwise."""
    if not _PUBLISHING.depth:
        return False
    _PUBLISHING.pending = _PUBLISHING.pending or signum
    return True


@contextmanager
def _critical() -> Iterator[None]:
    """A block that a signal does not cut short: the signal takes effect when it ends."""
    _PUBLISHING.depth += 1
    try:
        yield
    finally:
        _PUBLISHING.depth -= 1
    if not _PUBLISHING.depth and _PUBLISHING.pending is not None:
        signum, _PUBLISHING.pending = _PUBLISHING.pending, None
        handler = signal.getsignal(signum)
        if callable(handler):
            handler(signum, None)
        elif handler == signal.SIG_DFL:
            signal.raise_signal(signum)
