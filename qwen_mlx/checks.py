"""Up-front checks of a generation request: each failure is a one-line ``RequestError`` (a
``ValueError``) naming the value and the limit, raised before anything is loaded or computed."""

from __future__ import annotations

import math
import numbers

import numpy as np

from qwen_mlx.errors import RequestError

MAX_SIDE = 8192  # pixels; the released model was trained up to 1664 (docs/cli.md)
MAX_STEPS = 1000  # the scheduler's num_train_timesteps: more steps repeat timesteps
SEED_MAX = 2**64 - 1  # MLX's random keys take unsigned 64-bit seeds
MAX_IMAGES = 64  # images per call


def is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_int(name: str, v, lo: int, hi: int | None = None) -> int:
    if not is_int(v):
        raise RequestError(f"{name} must be an integer, got {v!r}")
    if v < lo:
        raise RequestError(f"{name} must be at least {lo}, got {v}")
    if hi is not None and v > hi:
        raise RequestError(f"{name} must be at most {hi}, got {v}")
    return int(v)


def check_size(height, width, multiple: int = 16, max_side: int = MAX_SIDE) -> None:
    """Integer multiples of ``multiple`` (8x VAE, 2x2 patches) in [multiple, max_side]; a size
    that is not a multiple says what it would round to."""
    check_side("height", height, multiple, max_side)
    check_side("width", width, multiple, max_side)


def check_side(name: str, v, multiple: int = 16, max_side: int = MAX_SIDE) -> int:
    """One side of ``check_size``."""
    if not is_int(v):
        raise RequestError(f"{name} must be an integer number of pixels, got {v!r}")
    if v < multiple:
        raise RequestError(f"{name} {v} is too small; the minimum is {multiple}")
    if v > max_side:
        raise RequestError(f"{name} {v} is too large; the largest supported is {max_side}")
    if v % multiple:
        lo, hi = v // multiple * multiple, (v // multiple + 1) * multiple
        raise RequestError(f"{name} {v} is not a multiple of {multiple}; use {lo} or {hi}")
    return int(v)


def check_image_size(
    width: int,
    height: int,
    multiple: int = 16,
    max_side: int | None = None,
    what: str = "the image",
) -> None:
    """An input image that sets the output size: each side at least ``multiple`` and (when
    given) at most ``max_side`` pixels; the message says which side is wrong."""
    size = f"{what} is {width}x{height}"
    sides = (("width", width), ("height", height))
    small = [f"{name} {v}" for name, v in sides if v < multiple]
    if small:
        verb = "is" if len(small) == 1 else "are"
        raise RequestError(
            f"{size}: its {' and '.join(small)} {verb} below the minimum of {multiple} pixels"
        )
    large = [f"{name} {v}" for name, v in sides if max_side and v - v % multiple > max_side]
    if large:
        verb = "is" if len(large) == 1 else "are"
        raise RequestError(
            f"{size}: its {' and '.join(large)} {verb} above the largest output side of "
            f"{max_side} pixels; give a width and height to resize it to"
        )


def check_steps(steps, max_steps: int = MAX_STEPS, name: str = "num_inference_steps") -> int:
    """At least 1; at most the scheduler's 1000 training timesteps (more would repeat them)."""
    return check_int(name, steps, 1, max_steps)


def check_cfg(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise RequestError(f"the CFG scale must be a finite number, got {scale!r}")
    return float(scale)


def check_seeds(seeds: list, batch: int = 1) -> list[int]:
    """Seeds are integers in [0, 2**64 - 1]; image i of seed s uses s + i, which must fit too."""
    out = []
    for s in seeds:
        if not is_int(s):
            raise RequestError(f"a seed must be an integer, got {s!r}")
        if not 0 <= s <= SEED_MAX - (batch - 1):
            raise RequestError(
                f"seed {s} is out of range; seeds go from 0 to {SEED_MAX - batch + 1}"
            )
        out.append(int(s))
    return out


def check_prompts(prompt, name: str = "prompt") -> list[str]:
    """A string or a non-empty list of strings."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise RequestError(
            f"{name} must be a string or a non-empty list of strings, got {prompt!r}"
        )
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise RequestError(f"{name} must hold strings, got {bad[0]!r}")
    return list(prompts)


def check_sigmas(sigmas, steps: int) -> np.ndarray:
    """A custom schedule: ``steps`` finite values in (0, 1], non-increasing."""
    try:
        s = np.asarray(sigmas, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise RequestError(f"sigmas must be a list of numbers: {e}") from None
    if s.ndim != 1 or len(s) != steps:
        raise RequestError(f"sigmas must hold one value per step ({steps}), got shape {s.shape}")
    if not np.isfinite(s).all() or (s <= 0).any() or (s > 1).any():
        raise RequestError(f"sigmas must lie in (0, 1], got {s.tolist()}")
    if (np.diff(s) > 0).any():
        raise RequestError(f"sigmas must not increase, got {s.tolist()}")
    return s
