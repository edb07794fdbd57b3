"""The ``qwen-mlx`` command line: one module per command (``convert``, ``generate`` and
``edit``, ``info``, ``control``, ``serve``), the options and error handling they share in
``common``."""

from __future__ import annotations

import typer

from qwen_mlx.cli import control, convert, generate, info, serve

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="MLX inference for Qwen-Image on Apple Silicon.",
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """MLX inference for Qwen-Image on Apple Silicon."""


for _command in (convert, generate, info, control, serve):
    _command.register(app)

__all__ = ["app"]
