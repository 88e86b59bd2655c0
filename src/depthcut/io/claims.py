"""Claims of an output: one writer per OUT. `claim_output` runs before any heavy work: it takes a
lock beside OUT (`.OUT.lock`, an `flock`, never opened through a link), so that a second run at
the same OUT fails at once; removes the temporaries of OUT left by runs that were killed; and
checks OUT (`depthcut.io.output_checks`). The claim is held until `release_claims`."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from depthcut.errors import DepthcutError
from depthcut.io.output_checks import check_for_kind, check_output_dir, check_output_file, not_writable
from depthcut.io.signals import critical
from depthcut.io.temporaries import identity, remove_stale

# A file system without locks (some network ones) answers flock with one of these: go on unlocked.
_NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP)


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
    check_for_kind(out, force, kind, may_exist)  # nothing is created for a refused OUT
    claim = Claim(out, kind, force)
    _CLAIMS[key] = claim
    try:
        claim.made = _make_parents(out)
        claim.lock_fd, claim.lock_path = _lock(out)
        remove_stale(out.parent, out.name)
        check_for_kind(out, force, kind, may_exist)  # again: a run that held the lock may just have published
        claim.existing = identity(out)
    except BaseException:
        _release(claim)
        raise
    return claim


def release_claims() -> None:
    """Release every claim this process holds: unlock, remove the lock files, and remove the parent
    folders a claim created that stayed empty (a failed command leaves nothing behind). A signal
    waits until this is done."""
    with critical():
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
def claimed_for_writing(out: str | Path, force: bool, kind: str = "dir", may_exist: bool = False, *,
                        writer: bool = True) -> Iterator[None]:
    """`out` checked and locked for the block, before any heavy work: a second run at the same path
    fails at once. In a data-parallel launch only the first process writes (`writer`, from
    `depthcut.model.distributed.is_main_process`), so the others only check the path."""
    if not writer:
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
        raise not_writable(out, error) from None
    return made


def _lock(out: Path) -> tuple[int | None, Path | None]:
    """An exclusive, non-blocking flock on `.OUT.lock` beside `out`; fails at once when held."""
    import fcntl  # deferred: POSIX only, and only where an output is locked

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
            if error.errno not in _NO_LOCKS:
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
        raise not_writable(out, error) from None
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
