"""``qwen-mlx control``: ControlNet preprocessors (OpenCV, the optional ``control`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from qwen_mlx.cli.common import OverwriteOpt, UserError, user_errors

control_app = typer.Typer(
    no_args_is_help=True,
    help="ControlNet preprocessors (OpenCV: pip install 'qwen-mlx[control]').",
)


def register(app: typer.Typer) -> None:
    app.add_typer(control_app, name="control")


@control_app.command("canny")
def canny(
    image: Annotated[Path, typer.Argument(help="Input image")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Edge map (PNG)")],
    low: Annotated[int, typer.Option(help="Canny lower hysteresis threshold")] = 100,
    high: Annotated[int, typer.Option(help="Canny upper hysteresis threshold")] = 200,
    overwrite: OverwriteOpt = False,
) -> None:
    """Canny edges of IMAGE (white on black), for the Union ControlNet's --control-image."""
    from qwen_mlx.control import canny as canny_edges
    from qwen_mlx.outputs import save_exclusive
    from qwen_mlx.pipelines.img2img import as_pil

    with user_errors():
        if output.suffix.lower() != ".png":
            raise UserError(f"--output must end in .png, got {output}")
        if output.exists() and not overwrite:
            raise UserError(f"{output} exists; pass --overwrite to replace it")
        edges = canny_edges(as_pil(image), low, high)
        path, why = save_exclusive(output, lambda tmp: edges.save(tmp, format="PNG"), overwrite)
        if why:
            typer.echo(f"warning: {why}; wrote {path}", err=True)
        typer.echo(f"wrote {path} ({edges.width}x{edges.height}, canny {low}/{high})")
