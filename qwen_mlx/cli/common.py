"""What every command shares: one-line errors and exit codes, option types."""

from __future__ import annotations

import os
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from qwen_mlx.messages import one_line  # noqa: F401 - the CLI modules import it from here

DEBUG_ENV = "QWEN_MLX_DEBUG"  # =1: let tracebacks through


class UserError(Exception):
    """A problem with the user's input found by the CLI itself: one line, exit code 2."""


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line, ``warning: ...`` (no source location; ``qwen_mlx.messages``)."""
    from qwen_mlx.messages import warning_line

    print(warning_line(message, category), file=file or sys.stderr)


@contextmanager
def user_errors():
    """Every failure as a one-line message, never a traceback (``QWEN_MLX_DEBUG=1`` shows it).

    Exit codes: 2 for what the user can fix (the project's own errors: bad input, a missing
    or corrupt file, memory; and the environment: files, disk, permissions), 130 for Ctrl-C or
    a cancelled run, 1 for anything else (an internal bug, named as unexpected).
    """
    from qwen_mlx.errors import Cancelled, QwenMLXError

    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    previous = warnings.showwarning
    if not debug:
        warnings.showwarning = _warning_line
    try:
        yield
    except typer.Exit:
        raise
    except (KeyboardInterrupt, Cancelled):
        if debug:
            raise
        typer.echo("error: interrupted; nothing was written", err=True)
        raise typer.Exit(130) from None
    except (UserError, QwenMLXError, OSError, MemoryError) as e:
        if debug:
            raise
        _error_line(e)
        raise typer.Exit(2) from None
    except Exception as e:  # noqa: BLE001 - the last line of defence
        if debug:
            raise
        from qwen_mlx.distributed import peer_lost

        if peer_lost(e):  # another process of an mlx.launch job went away
            _error_line(e)
            raise typer.Exit(2) from None
        typer.echo(
            f"error: unexpected {type(e).__name__}: {one_line(e)} "
            f"({DEBUG_ENV}=1 shows the traceback)",
            err=True,
        )
        raise typer.Exit(1) from None
    finally:
        warnings.showwarning = previous


def _error_line(e: BaseException) -> None:
    """``error: ...``; under mlx.launch, once for the job (``distributed.error_line``)."""
    from qwen_mlx.distributed import error_line

    line = error_line(e)
    if line is not None:
        typer.echo(f"error: {line}", err=True)


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


ASPECTS = {
    "1:1": (1328, 1328),
    "16:9": (1664, 928),
    "9:16": (928, 1664),
    "4:3": (1472, 1104),
    "3:4": (1104, 1472),
    "3:2": (1584, 1056),
    "2:3": (1056, 1584),
}

# Options shared by `generate` and `edit` (each command keeps its own defaults).
ModelOpt = Annotated[str, typer.Option(help="Converted or diffusers folder, or hub repo id")]
NegativeOpt = Annotated[str, typer.Option(help="Negative prompt (true CFG)")]
StepsOpt = Annotated[
    int | None,
    typer.Option(help="Denoising steps [default: the model's: 50; Edit-2509/2511 40]"),
]
CfgOpt = Annotated[
    float | None, typer.Option(help="True CFG scale (<= 1 disables CFG) [default: 4]")
]
SeedOpt = Annotated[
    list[int] | None, typer.Option(help="Seed; repeat for several images; none = random")
]
WidthOpt = Annotated[int | None, typer.Option(help="Width in pixels (multiple of 16)")]
HeightOpt = Annotated[int | None, typer.Option(help="Height in pixels (multiple of 16)")]
OutputOpt = Annotated[Path | None, typer.Option("--output", "-o", help="PNG path")]
PrecisionOpt = Annotated[
    str | None,
    typer.Option(help="Override the stored plan: fp32, bf16, fp16, mixed, auto (this Mac)"),
]
LowMemoryOpt = Annotated[bool, typer.Option(help="Free the transformer before decoding")]
OverwriteOpt = Annotated[
    bool, typer.Option(help="Replace existing PNGs (by default an existing file is an error)")
]
IgnoreMemoryOpt = Annotated[
    bool, typer.Option(help="Run even if the estimated peak exceeds this machine's memory")
]
LoraOpt = Annotated[
    list[str] | None,
    typer.Option(help="LoRA file PATH[:SCALE] (scale 1 by default); repeat to stack"),
]
LightningOpt = Annotated[
    int | None,
    typer.Option(
        help="Lightning preset for the 4- or 8-step Lightning LoRA (give it with --lora): "
        "its scheduler, that many steps, CFG 1"
    ),
]
QuantizeOpt = Annotated[
    int | None, typer.Option(help="Quantize a float transformer as it loads: 4 or 8 bits")
]
QuantizeTextOpt = Annotated[
    str, typer.Option(help="Language model: 4, 8, none, or auto (8 with --quantize)")
]
AdalnOpt = Annotated[
    bool,
    typer.Option(
        "--adaln-cache/--no-adaln-cache",
        help="Precompute the modulation for the schedule (the transformer then loads "
        "without its 6.8 B modulation parameters); off computes it every step",
    ),
]
DryRunOpt = Annotated[
    bool,
    typer.Option(
        help="Print the plan and the expected peak memory; load and write nothing "
        "(exit 2 when it does not fit)"
    ),
]
MaxSeqOpt = Annotated[int, typer.Option(help="Prompt token limit")]
ParallelOpt = Annotated[
    str,
    typer.Option(
        help="Under mlx.launch: split the job across the processes by cfg branch, seeds or "
        "tensor (the transformer's layers); auto picks (docs/distributed.md)"
    ),
]
CacheOpt = Annotated[
    str | None,
    typer.Option(
        help="Step cache (docs/speed.md): fbcache[:THRESHOLD], taylorseer[:INTERVAL], "
        "taylorseer-lite[:INTERVAL] or magcache[:THRESHOLD]"
    ),
]
CacheCalibrateOpt = Annotated[
    bool,
    typer.Option(
        help="Measure MagCache's ratios for this model and schedule (an uncached run) and "
        "store them for later --cache magcache runs"
    ),
]


def parse_lora(spec: str) -> tuple[Path, float]:
    """``--lora PATH[:SCALE]`` -> (path, scale), the file checked (``lora.parse_lora_spec``)."""
    from qwen_mlx.lora import parse_lora_spec

    return parse_lora_spec(spec)
