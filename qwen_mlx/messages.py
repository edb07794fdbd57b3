"""How qwen-mlx words what it tells the user: one line per error or warning.

``install_warning_format`` (called by the command line) prints every Python warning as one line
``warning: <message>``, without the source file, line number and code line Python adds.
"""

from __future__ import annotations

import sys
import warnings


def one_line(e: BaseException | str) -> str:
    """An exception's (or a text's) message with every run of whitespace made one space."""
    text = " ".join(str(e).split())
    return text or (type(e).__name__ if isinstance(e, BaseException) else "")


def ignored_memory_limit(error: BaseException) -> str:
    """The warning of a run that goes ahead past the memory guard (``--ignore-memory-limit``)."""
    return f"warning: {one_line(error)}; going ahead (--ignore-memory-limit)"


def warning_line(message: Warning | str, category: type[Warning] = UserWarning) -> str:
    """``warning: <message>`` on one line; a category other than UserWarning is named."""
    text = one_line(message) if str(message).strip() else category.__name__
    if category is not UserWarning and not issubclass(UserWarning, category):
        text = f"{category.__name__}: {text}"
    return f"warning: {text}"


def _show(message, category, filename, lineno, file=None, line=None) -> None:
    stream = sys.stderr if file is None else file
    try:
        stream.write(warning_line(message, category) + "\n")
    except (OSError, AttributeError):  # no usable stderr (as warnings.showwarning itself)
        pass


def install_warning_format() -> None:
    """Print warnings as ``warning: ...`` lines (the command line installs this; Python users
    keep Python's format unless they call it)."""
    warnings.showwarning = _show


def non_finite_message(step: int, total: int, plan: str, loras: int = 0) -> str:
    """What to say when the latents become NaN/inf at ``step``: the fp16 plans can overflow
    (try bf16 / fp32); the others do not, so the cause is a value fed in."""
    msg = f"latents became non-finite (NaN/inf) at step {step}/{total}"
    if plan in ("fp16", "mixed", "float16"):
        return f"{msg} under the {plan!r} precision plan; try precision='bf16' or 'fp32'"
    fed = (
        "the LoRAs or their scales, the weights or the inputs"
        if loras
        else ("the weights or the inputs")
    )
    return (
        f"{msg} under the {plan!r} precision plan, whose range does not overflow here: "
        f"{fed} hold NaN/inf or values too large"
    )
