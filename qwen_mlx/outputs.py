"""Writing images without losing one or clobbering one.

* The output location is checked before anything loads: ``-o`` must not be a folder, its folder
  must be creatable and writable, and an existing file is refused unless ``overwrite``.
* Files are created exclusively: written to a temporary name, then hard-linked to their name
  (which fails if the name exists, so parallel runs cannot clobber each other) or, with
  ``overwrite``, renamed over it.
* An output that is one of the run's inputs (an ``--image``, a ``--mask``, an Edit image) is
  refused even with ``overwrite``: paths are compared resolved (symbolic links, ``./`` and
  ``..`` spellings) and, for files that exist, as the same file on disk (hard links, a
  case-insensitive filesystem's other spelling).
* If writing still fails at the end (the name was taken meanwhile, the folder went away or
  became read-only, the disk is full), the image is saved under a fallback name (``NAME.1.png``
  and up, then the current folder, then the system's temporary folder) and the caller says where.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from qwen_mlx.errors import QwenMLXError


class OutputError(QwenMLXError, ValueError):
    """The output location cannot be used (named in the message)."""


def _existing_ancestor(path: Path) -> Path:
    p = path
    while not p.exists():
        if p == p.parent:
            break
        p = p.parent
    return p


def _probe(folder: Path) -> None:
    """Create and remove a file in ``folder``: the only test of writability that is true for
    read-only filesystems, ACLs and root alike."""
    probe = folder / f".qwen-mlx-probe-{secrets.token_hex(4)}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"cannot write in {folder}: {e.strerror or e}") from None


def check_outputs(paths: list[Path], overwrite: bool = False) -> None:
    """Refuse, before any work, outputs that could not be written or would replace a file."""
    for path in paths:
        if path.is_dir():
            raise OutputError(f"{path} is a folder; give a file name ending in .png")
        if path.exists() and not overwrite:
            raise OutputError(f"{path} already exists; pass --overwrite to replace it")
        if path.is_symlink() and overwrite:
            raise OutputError(f"{path} is a symbolic link; name a regular file")
        folder = _existing_ancestor(path.parent)
        if not folder.is_dir():
            raise OutputError(f"cannot create {path.parent}: {folder} is a file")
        _probe(folder)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``a`` and ``b`` name one file: equal once resolved, or (both existing) the
    same inode."""
    a, b = Path(a).expanduser(), Path(b).expanduser()
    try:
        if a.resolve() == b.resolve():
            return True
    except (OSError, RuntimeError):  # a symlink loop: fall through to the inode test
        pass
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def check_not_inputs(
    outputs: Iterable[str | os.PathLike],
    inputs: Iterable[tuple[str, str | os.PathLike]],
) -> None:
    """Refuse an output that would replace one of the run's inputs, whatever ``overwrite`` says.

    ``inputs`` are ``(label, path)`` pairs, the label saying where the input came from
    (``"--image"``, ``"mask_image"``); in-memory inputs have no path and are left out."""
    inputs = [(label, path) for label, path in inputs if path is not None]
    for out in outputs:
        for label, path in inputs:
            if same_file(out, path):
                raise OutputError(
                    f"{out} would overwrite an input image ({label} {path}); "
                    "name another output file"
                )


def _write_temp(folder: Path, name: str, write: Callable[[Path], None]) -> Path:
    tmp = folder / f".{name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        write(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _place(tmp: Path, path: Path, overwrite: bool) -> None:
    """Give ``tmp`` the name ``path``: exclusively unless ``overwrite``."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if path exists: never clobbers
    finally:
        tmp.unlink(missing_ok=True)


def save_exclusive(
    path: Path, write: Callable[[Path], None], overwrite: bool = False
) -> tuple[Path, str | None]:
    """Write a file with ``write(tmp_path)`` and give it the name ``path``.

    Returns (where it was written, None) or, when ``path`` could not be used, (the fallback it
    was written to, why ``path`` failed). Raises OSError only if no fallback works either."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _write_temp(path.parent, path.name, write)
        _place(tmp, path, overwrite)
        return path, None
    except OSError as e:
        why = (
            f"{path} was created by someone else meanwhile"
            if isinstance(e, FileExistsError)
            else f"cannot write {path}: {e.strerror or e}"
        )
    for candidate in fallbacks(path):
        try:
            tmp = _write_temp(candidate.parent, candidate.name, write)
            _place(tmp, candidate, False)
            return candidate, why
        except OSError:
            continue
    raise OSError(f"{why}; no fallback location could be written either")


def fallbacks(path: Path, tries: int = 20):
    """``NAME.1.png``... next to ``path``, then in the current folder, then in the temp dir."""
    for folder in (path.parent, Path.cwd(), Path(tempfile.gettempdir())):
        for i in range(1, tries + 1):
            yield folder / f"{path.stem}.{i}{path.suffix}"
