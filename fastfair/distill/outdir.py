"""The output directory of a run: writability checks before any work, an
exclusive lock against a second run into the same directory, and atomic
file writes that leave no temporary file behind on any failure.

Torch-free, so the CLI can check its output paths before it imports torch.
"""
from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from typing import IO, Callable, Iterator

LOCK = ".fastfair.lock"


class DirectoryInUse(ValueError):
    """Another fastfair process holds the output directory's lock; ``pid``
    is the holder's (as it wrote it; "?" if unreadable)."""

    def __init__(self, message: str, pid: str) -> None:
        super().__init__(message)
        self.pid = pid


class OutputError(OSError):
    """A file of the run could not be written (disk full, read-only, ...);
    the message says which and that the previous version is kept."""

    def __str__(self) -> str:  # the message alone, without "[Errno 28]"
        return str(self.strerror)


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through ``write(f)`` on a temporary file beside it, then
    os.replace: a kill leaves the old file or the new one, never half; any
    failure (ENOSPC, EIO, an exception of ``write``, Ctrl-C) removes the
    temporary file, and an OSError becomes an OutputError naming ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
        # mkstemp makes 0600; the output gets the mode any other tool's file
        # would (0666 less the umask), so colleagues on a shared folder can read it.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        kept = " (the previous file is kept)" if os.path.exists(path) else ""
        raise OutputError(exc.errno or errno.EIO, f"cannot write {path}: {_reason(exc)}{kept}") from exc
    except RuntimeError as exc:
        # torch.save's zip writer turns ENOSPC / EIO into a RuntimeError
        # ("[enforce fail at inline_container.cc] unexpected pos ...").
        if not _is_torch_write_error(exc):
            raise
        kept = " (the previous file is kept)" if os.path.exists(path) else ""
        raise OutputError(errno.EIO, f"cannot write {path}: torch's writer failed "
                                     f"({_first_line(exc)}); is the disk full?{kept}") from exc
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _is_torch_write_error(exc: RuntimeError) -> bool:
    msg = str(exc)
    return any(k in msg for k in ("inline_container", "PytorchStreamWriter", "unexpected pos", "file write failed"))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def check_writable_dir(path: str, flag: str = "--out") -> None:
    """Prove that ``path`` (or, while it does not exist, the ancestor it would
    be created in) takes a new file, so a read-only or full filesystem fails
    before any work (ValueError). Creates nothing that outlives the check."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a file, not a directory")
    where = os.path.abspath(path)
    while not os.path.isdir(where):
        parent = os.path.dirname(where)
        if os.path.exists(where) or parent == where:  # a file on the way
            raise ValueError(f"{flag} {path!r} cannot be created: {where!r} is not a directory")
        where = parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".fastfair-write-test.", dir=where)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"{flag} {path!r} is not writable: {_reason(exc)}") from None


def check_writable_file(path: str, flag: str) -> None:
    """``path`` can be created or replaced (its directory is writable)."""
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a directory, not a file")
    check_writable_dir(os.path.dirname(os.path.abspath(path)), f"the directory of {flag}")


_HELD: dict[str, int] = {}  # realpath -> nesting depth of this process's lock


@contextlib.contextmanager
def locked(path: str) -> Iterator[None]:
    """Hold an exclusive lock on the output directory ``path`` (created if
    needed) for the duration: a second run into it fails at once with a
    ValueError naming the holder's pid. The lock is an flock on
    ``path/.fastfair.lock``, which the kernel releases when its holder dies,
    so a killed run leaves no stale lock."""
    key = os.path.realpath(path)
    if key in _HELD:  # re-entrant (the CLI locks, then distill.run): a second flock would fail on ourselves
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    lock = os.path.join(path, LOCK)
    created = not os.path.isdir(path)
    fd = _acquire(path, lock)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD[key] = 1
        try:
            yield
        finally:
            del _HELD[key]
            if created and _only_lock(path):
                # Nothing was written (a bad option, a missing dataset): leave no directory behind.
                with contextlib.suppress(OSError):
                    os.unlink(lock)
    finally:
        os.close(fd)  # releases the flock
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(path)  # fails, as it should, when anything is inside


def holder(path: str) -> str | None:
    """The pid of the fastfair process holding ``path``'s lock, or None when
    none does. Read from /proc/locks where there is one, so that asking
    never takes the lock, not even for an instant in which a starting run
    would find it held; elsewhere a non-blocking probe. Creates nothing."""
    lock = os.path.join(path, LOCK)
    try:
        st = os.stat(lock)
        with open("/proc/locks") as f:
            table = f.read()
    except FileNotFoundError as exc:
        if exc.filename == lock:
            return None
        return _probe_holder(lock)
    except OSError:
        return _probe_holder(lock)
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in table.splitlines():
        f = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"; "1: -> FLOCK ..." is a waiter
        if len(f) >= 6 and f[1] == "FLOCK" and f[5] == ident:
            return f[4]
    return None


def _probe_holder(lock: str) -> str | None:
    import fcntl

    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
    finally:
        os.close(fd)  # releases the shared lock if it was taken
    return None


def _only_lock(path: str) -> bool:
    try:
        return os.listdir(path) == [LOCK]
    except OSError:
        return False


def _acquire(path: str, lock: str) -> int:
    """An fd holding the flock of ``lock``; a file that a finishing run
    unlinked between our open and our flock is opened again."""
    import fcntl

    for _ in range(10):
        os.makedirs(path, exist_ok=True)
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ValueError(f"cannot create the lock file {lock!r}: {_reason(exc)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ValueError(f"cannot lock {lock!r}: {_reason(exc)}") from None
            raise DirectoryInUse(f"{path!r} is in use by another fastfair run (pid {holder}); wait for it, or "
                                 "choose another --out", holder) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except OSError:
            same = False
        if same:
            return fd
        os.close(fd)
    raise ValueError(f"cannot lock {lock!r}: it keeps being replaced")


def main_rank_lock(path: str) -> contextlib.AbstractContextManager:
    """:func:`locked` on the process that writes the outputs: rank 0 under
    torchrun (RANK unset: a single process). The other ranks never write into
    ``path``; if rank 0 fails to lock, torchrun stops them with it."""
    return locked(path) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext()
