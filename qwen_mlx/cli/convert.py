"""``qwen-mlx convert``: Hugging Face diffusers layout -> MLX, every constant folded."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from qwen_mlx.cli.common import UserError, user_errors


def register(app: typer.Typer) -> None:
    app.command()(convert)


def convert(
    src: Annotated[Path, typer.Argument(help="Hugging Face diffusers-layout checkpoint folder")],
    dst: Annotated[Path, typer.Argument(help="Output folder for the MLX checkpoint")],
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16")] = "bfloat16",
    precision: Annotated[
        str | None,
        typer.Option(
            help="Transformer precision plan: fp32, bf16, fp16 (folded scaling), mixed, auto "
            "(picks for THIS machine: convert on the Mac or name the plan)"
        ),
    ] = None,
    variant: Annotated[
        str | None,
        typer.Option(help="Model variant for the fp16 scale table (default: detected)"),
    ] = None,
    quantize: Annotated[
        int | None,
        typer.Option(help="Store the transformer quantized: 4 or 8 bits (see docs/memory.md)"),
    ] = None,
    group_size: Annotated[int, typer.Option(help="Quantization group size")] = 64,
    quantize_text_encoder: Annotated[
        str,
        typer.Option(
            help="Language model: 4, 8, none, or auto (8 bits with --quantize, else none)"
        ),
    ] = "auto",
    force: Annotated[
        bool,
        typer.Option(help="Replace DST if it is an empty folder or a qwen-mlx checkpoint"),
    ] = False,
) -> None:
    """Convert a Qwen-Image checkpoint to MLX (runs on any machine with MLX, no GPU needed)."""
    from qwen_mlx.convert import ConvertOptions, convert_checkpoint
    from qwen_mlx.convert.errors import ConversionInterrupted
    from qwen_mlx.device import auto_precision
    from qwen_mlx.progress import Progress
    from qwen_mlx.quantize import text_encoder_bits

    with user_errors():
        start = time.perf_counter()
        te_bits = text_encoder_bits(quantize_text_encoder, quantize)
        if precision == "auto":
            precision, why = auto_precision()
            typer.echo(f"precision auto -> {precision} ({why})", err=True)
        if precision is not None and precision not in ("fp32", "bf16", "fp16", "mixed"):
            raise UserError(
                f"unknown precision {precision!r}; choose fp32, bf16, fp16, mixed, auto"
            )
        options = ConvertOptions(
            dtype=dtype,
            precision=precision,
            variant=variant,
            quantize=quantize,
            group_size=group_size,
            quantize_text_encoder=te_bits,
        )
        try:  # per component and shard: bytes done of the total, rate, time left
            with Progress() as progress:
                out = convert_checkpoint(
                    src,
                    dst,
                    options,
                    force=force,
                    log=lambda m: typer.echo(m, err=True),
                    progress=lambda event: progress(event.update()),
                )
        except (KeyboardInterrupt, ConversionInterrupted) as e:
            typer.echo(f"error: {e or 'interrupted'}; nothing was written to {dst}", err=True)
            raise typer.Exit(128 + getattr(e, "signum", 2)) from None
        what = precision or dtype
        if quantize:
            what += f", transformer {quantize}-bit"
        if te_bits:
            what += f", text encoder {te_bits}-bit"
        typer.echo(f"wrote {out} ({what}) in {time.perf_counter() - start:.1f} s")
