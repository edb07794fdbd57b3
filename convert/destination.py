"""Where a conversion writes, and how its output lands there without harming anything else.

* DST is never the source, inside it or a folder containing it, never a file or a symlink, and
  ``--force`` only ever replaces a folder that is empty or a qwen-mlx converted checkpoint.
* One conversion per DST at a time: ``.DST.lock`` next to DST, created exclusively with its
  owner's PID inside; a lock whose PID is no longer running is taken over.
* The output is built in ``.DST.tmp-XXXXXXXX`` (its owner's PID in ``OWNER_FILE``) and renamed
  into place. A DST that appeared meanwhile is never touched: the run stops and the finished
  output is kept under a visible name. With ``--force`` an existing DST is moved aside, the new
  one renamed in, and the old one removed only if it is still what was checked.
* SIGTERM and SIGHUP interrupt a conversion as Ctrl-C does, so the temporary folder is removed;
  temporary folders left by runs that died anyway (``kill -9``, power loss) are removed by the
  next run for the same DST.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from qwen_mlx.convert.errors import ConversionError, ConversionInterrupted
from qwen_mlx.io import is_converted

OWNER_FILE = ".qwen-mlx-owner"  # inside a temporary folder: the PID of the run writing it
STALE_KINDS = ("tmp", "old")  # .DST.tmp-* (unfinished output), .DST.old-* (replaced output)

Log = Callable[[str], None]


# ----------------------------------------------------------------------------- checks


def is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def replaceable(path: Path) -> bool:
    """What ``--force`` may replace: an empty folder or a qwen-mlx converted checkpoint."""
    return not path.is_symlink() and path.is_dir() and (is_empty_dir(path) or is_converted(path))


def check_destination(src: Path, dst: Path, force: bool) -> None:
    """Refuse any DST whose replacement could lose data (see the module docstring)."""
    if dst.is_symlink():
        raise ConversionError(f"{dst} is a symbolic link; name a real folder for the output")
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"{dst} is a file, not a folder; choose another output folder")
    try:
        s, d = src.resolve(), dst.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise ConversionError(f"cannot resolve {dst}: {e}") from e
    if d == s:
        raise ConversionError(f"{dst} is the source checkpoint itself; choose another folder")
    if d in s.parents:
        raise ConversionError(f"{dst} contains the source checkpoint {src}; choose another folder")
    if s in d.parents:
        raise ConversionError(f"{dst} lies inside the source checkpoint {src}; write it elsewhere")
    if dst.exists():
        if not force:
            raise ConversionError(f"{dst} already exists; pass --force to overwrite it")
        if not replaceable(dst):
            raise ConversionError(
                f"{dst} is neither empty nor a qwen-mlx checkpoint (no qwen_mlx section in its "
                "model_index.json): --force only replaces those; remove it yourself or choose "
                "another folder"
            )


# ----------------------------------------------------------------------------- processes


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- the lock


def lock_path(dst: Path) -> Path:
    return dst.parent / f".{dst.name}.lock"


def _create_lock(lock: Path) -> bool:
    """Create ``lock`` holding our PID, atomically with its content; False if it exists."""
    pending = lock.with_name(f"{lock.name}.{os.getpid()}-{secrets.token_hex(4)}")
    pending.write_text(f"{os.getpid()}\n")
    try:
        os.link(pending, lock)  # fails if lock exists; never visible without its PID
        return True
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        return True
    finally:
        pending.unlink(missing_ok=True)


def _take_over(lock: Path, dead: int) -> None:
    """Remove a stale lock of PID ``dead``, unless another run replaced it meanwhile."""
    grabbed = lock.with_name(f"{lock.name}.stale-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.rename(lock, grabbed)
    except FileNotFoundError:
        return  # another run took it over first
    if read_pid(grabbed) != dead:  # a live run's fresh lock: put it back
        with contextlib.suppress(FileExistsError):
            os.link(grabbed, lock)
    grabbed.unlink(missing_ok=True)


@contextlib.contextmanager
def locked(dst: Path, log: Log) -> Iterator[None]:
    """Hold DST's lock for the duration; a second conversion to DST is refused, saying why."""
    lock = lock_path(dst)
    for _ in range(10):
        if _create_lock(lock):
            break
        pid = read_pid(lock)
        if pid is not None and pid_alive(pid):
            raise ConversionError(
                f"another conversion (PID {pid}) is writing {dst}; wait for it to finish "
                f"(if no conversion is running, remove {lock})"
            )
        _take_over(lock, pid)
        log(f"took over {lock}, left by a conversion that is no longer running (PID {pid})")
    else:
        raise ConversionError(f"cannot take the lock {lock}; remove it if no conversion is running")
    try:
        yield
    finally:
        if read_pid(lock) == os.getpid():
            lock.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- temporary folders


def _sibling(dst: Path, kind: str) -> str:
    return f".{dst.name}.{kind}-"


def make_temp(dst: Path) -> Path:
    """A fresh ``.DST.tmp-XXXXXXXX`` folder with normal permissions (mkdir honours the umask,
    unlike mkdtemp's 0700) and our PID recorded inside."""
    for _ in range(100):
        tmp = dst.parent / f"{_sibling(dst, 'tmp')}{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
        except FileExistsError:
            continue
        (tmp / OWNER_FILE).write_text(f"{os.getpid()}\n")
        return tmp
    raise ConversionError(f"cannot create a temporary folder next to {dst}")


def remove_stale(dst: Path, log: Log) -> None:
    """Remove what dead runs for DST left behind (called holding DST's lock)."""
    for path in sorted(dst.parent.iterdir()):
        kind = next((k for k in STALE_KINDS if path.name.startswith(_sibling(dst, k))), None)
        if kind is None or path.is_symlink() or not path.is_dir():
            continue
        pid = read_pid(path / OWNER_FILE)
        if pid is None:
            log(f"note: {path} looks like an interrupted conversion's leftover with no owner "
                "recorded; remove it yourself if no conversion is running")  # fmt: skip
        elif pid_alive(pid):
            continue
        elif kind == "old" and not os.path.lexists(dst):  # died between the two renames
            (path / OWNER_FILE).unlink()
            os.rename(path, dst)
            log(f"restored {dst} from {path}, left by an interrupted conversion (PID {pid})")
        else:
            shutil.rmtree(path)
            log(f"removed {path}, left by an interrupted conversion (PID {pid})")


def _keep(tmp: Path, dst: Path) -> Path:
    """Give a finished output a visible name of its own next to DST."""
    for _ in range(100):
        keep = dst.with_name(f"{dst.name}.converted-{secrets.token_hex(3)}")
        try:
            keep.mkdir()
        except FileExistsError:
            continue
        os.rename(tmp, keep)  # replaces the empty folder we just made
        return keep
    return tmp


def _claim(dst: Path) -> bool:
    """Create DST empty, exclusively; False if anything is there already."""
    try:
        dst.mkdir()
        return True
    except FileExistsError:
        return False


def _rename_in(tmp: Path, dst: Path) -> bool:
    """Rename ``tmp`` onto the empty DST we created; False if someone wrote into it meanwhile."""
    try:
        os.rename(tmp, dst)
        return True
    except OSError:
        return False


def finish(tmp: Path, dst: Path, force: bool, log: Log) -> None:
    """Move the finished output ``tmp`` to DST, deleting nothing that was not checked."""
    (tmp / OWNER_FILE).unlink()
    if not os.path.lexists(dst):
        if _claim(dst) and _rename_in(tmp, dst):
            return
        keep = _keep(tmp, dst)
        raise ConversionError(
            f"{dst} appeared during the conversion (not made by it) and was left untouched; "
            f"the finished conversion was kept as {keep}"
        )
    if not force or not replaceable(dst):
        keep = _keep(tmp, dst)
        why = "appeared" if not force else "changed into something --force does not replace"
        raise ConversionError(
            f"{dst} {why} during the conversion and was left untouched; "
            f"the finished conversion was kept as {keep}"
        )
    aside = dst.parent / f"{_sibling(dst, 'old')}{secrets.token_hex(4)}"
    os.rename(dst, aside)
    still_replaceable = replaceable(aside)  # checked again now that nobody can reach it
    (aside / OWNER_FILE).write_text(f"{os.getpid()}\n")
    if not (_claim(dst) and _rename_in(tmp, dst)):
        keep = _keep(tmp, dst)
        (aside / OWNER_FILE).unlink()
        raise ConversionError(
            f"{dst} appeared while it was being replaced; the previous checkpoint is at {aside} "
            f"and the finished conversion was kept as {keep}"
        )
    if still_replaceable:
        shutil.rmtree(aside)
    else:
        (aside / OWNER_FILE).unlink()
        log(f"kept the previous {dst} as {aside}: it changed during the conversion")


# ----------------------------------------------------------------------------- the run


def make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and missing parents; return those created, deepest first."""
    created = []
    p = folder
    while not os.path.lexists(p) and p != p.parent:
        created.append(p)
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    return created


def remove_created(created: list[Path]) -> None:
    """Remove the parents ``make_parents`` created, if they are still empty."""
    for p in created:
        try:
            p.rmdir()
        except OSError:
            break


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP raise ConversionInterrupted (as SIGINT raises KeyboardInterrupt), so
    the cleanup that runs for Ctrl-C runs for them too. Main thread only (Python's rule)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        raise ConversionInterrupted(signum)

    names = [s for s in ("SIGTERM", "SIGHUP") if hasattr(signal, s)]
    previous = {}
    for name in names:
        sig = getattr(signal, name)
        previous[sig] = signal.getsignal(sig)
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
