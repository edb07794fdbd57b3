"""The ``qwen-mlx`` command line."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="MLX inference for Qwen-Image on Apple Silicon.",
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """MLX inference for Qwen-Image on Apple Silicon."""


class UserError(Exception):
    """A problem with the user's input: reported in one line, exit code 2."""


@contextmanager
def user_errors():
    """Turn expected failures into one-line messages and exit code 2, never a traceback."""
    from convert import ConversionError

    try:
        yield
    except (UserError, ConversionError, ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


@app.command()
def convert(
    src: Annotated[Path, typer.Argument(help="Hugging Face diffusers-layout checkpoint folder")],
    dst: Annotated[Path, typer.Argument(help="Output folder for the MLX checkpoint")],
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16")] = "bfloat16",
    force: Annotated[bool, typer.Option(help="Overwrite DST if it exists")] = False,
) -> None:
    """Convert a Qwen-Image checkpoint to MLX (runs on any machine with MLX, no GPU needed)."""
    from convert import ConvertOptions, convert_checkpoint

    with user_errors():
        start = time.perf_counter()
        options = ConvertOptions(dtype=dtype)
        out = convert_checkpoint(
            src, dst, options, force=force, log=lambda m: typer.echo(m, err=True)
        )
        typer.echo(f"wrote {out} ({dtype}) in {time.perf_counter() - start:.1f} s")


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())
