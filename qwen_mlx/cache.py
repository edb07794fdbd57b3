"""Where qwen-mlx keeps what it computes once: ``$QWEN_MLX_CACHE`` (default ``~/.cache/qwen-mlx``).

Two users: hub checkpoints converted once (``<root>/<org>--<name>/``; required: a cache that
cannot be used is a one-line ``CacheError`` naming the setting) and the adaLN tables
(``<root>/adaln/``; optional: without a usable cache the run goes on, warned once).
"""

from __future__ import annotations

import os
from pathlib import Path

from qwen_mlx.errors import QwenMLXError

ENV = "QWEN_MLX_CACHE"
DEFAULT = Path("~") / ".cache" / "qwen-mlx"


class CacheError(QwenMLXError, OSError):
    """The cache folder cannot be used (the message names the setting to change)."""


def cache_root() -> Path:
    """``$QWEN_MLX_CACHE`` (an empty value counts as unset), else ``~/.cache/qwen-mlx``."""
    return Path(os.environ.get(ENV) or DEFAULT).expanduser()


def setting() -> str:
    """Where the cache location comes from, for messages."""
    value = os.environ.get(ENV)
    if value:
        return f"{ENV}={value}"
    return f"the default cache folder {DEFAULT} (set {ENV} to use another)"


def cache_folder(*parts: str) -> Path:
    """``cache_root() / parts``, created if needed; a CacheError naming the setting when it
    cannot be (the root or a part of it is a file, no permission, a read-only disk)."""
    folder = cache_root().joinpath(*parts)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocker = next((p for p in (folder, *folder.parents) if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            why = f"{blocker} is a file, not a folder"
        else:
            why = f"cannot create {folder}: {e.strerror or e}"
        raise CacheError(f"{setting()}: {why}; point {ENV} at a writable folder") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CacheError(f"{setting()}: {folder} is not writable; point {ENV} at a writable folder")
    return folder
