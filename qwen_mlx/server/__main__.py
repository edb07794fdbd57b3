"""``python -m qwen_mlx.server``: the same as ``qwen-mlx serve``."""

import typer

from qwen_mlx.cli.serve import serve

typer.run(serve)
