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
    from qwen_mlx.errors import QwenMLXError

    try:
        yield
    except (UserError, QwenMLXError, ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


@app.command()
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
    force: Annotated[
        bool,
        typer.Option(help="Replace DST if it is an empty folder or a qwen-mlx checkpoint"),
    ] = False,
) -> None:
    """Convert a Qwen-Image checkpoint to MLX (runs on any machine with MLX, no GPU needed)."""
    from qwen_mlx.convert import ConvertOptions, convert_checkpoint
    from qwen_mlx.convert.errors import ConversionInterrupted

    from .device import auto_precision

    with user_errors():
        start = time.perf_counter()
        if precision == "auto":
            precision, why = auto_precision()
            typer.echo(f"precision auto -> {precision} ({why})", err=True)
        if precision is not None and precision not in ("fp32", "bf16", "fp16", "mixed"):
            raise UserError(
                f"unknown precision {precision!r}; choose fp32, bf16, fp16, mixed, auto"
            )
        options = ConvertOptions(dtype=dtype, precision=precision, variant=variant)
        try:
            out = convert_checkpoint(
                src, dst, options, force=force, log=lambda m: typer.echo(m, err=True)
            )
        except (KeyboardInterrupt, ConversionInterrupted) as e:
            typer.echo(f"error: {e or 'interrupted'}; nothing was written to {dst}", err=True)
            raise typer.Exit(128 + getattr(e, "signum", 2)) from None
        typer.echo(f"wrote {out} ({precision or dtype}) in {time.perf_counter() - start:.1f} s")


ASPECTS = {
    "1:1": (1328, 1328),
    "16:9": (1664, 928),
    "9:16": (928, 1664),
    "4:3": (1472, 1104),
    "3:4": (1104, 1472),
    "3:2": (1584, 1056),
    "2:3": (1056, 1584),
}


def output_paths(output: Path | None, seeds: list[int]) -> list[Path]:
    """One PNG per seed: OUTPUT as given for one seed, OUTPUT-<seed>.png for several."""
    if output is None:
        return [Path(f"qwen-image-{s}.png") for s in seeds]
    if output.suffix.lower() != ".png":
        raise UserError(f"--output must end in .png, got {output}")
    if len(seeds) == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{s}{output.suffix}") for s in seeds]


def save_png(image, path: Path, params: dict) -> None:
    """Write atomically with the generation parameters (A1111 text + JSON chunks)."""
    import json

    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    a1111 = (
        f"{params['prompt']}\nNegative prompt: {params['negative_prompt'] or ''}\n"
        f"Steps: {params['steps']}, Sampler: FlowMatchEuler, CFG scale: {params['cfg']}, "
        f"Seed: {params['seed']}, Size: {params['width']}x{params['height']}, "
        f"Model: {params['model']}, Precision: {params['precision']}, "
        f"Version: qwen-mlx {params['version']}"
    )
    info.add_text("parameters", a1111)
    info.add_text("qwen_mlx", json.dumps(params, ensure_ascii=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


class Progress:
    """A one-line progress bar on stderr with per-step time and ETA."""

    def __init__(self, label: str):
        self.label = label
        self.start = time.perf_counter()

    def __call__(self, step: int, total: int, _latents=None) -> None:
        elapsed = time.perf_counter() - self.start
        per = elapsed / step
        width = 24
        bar = "#" * (width * step // total) + "-" * (width - width * step // total)
        typer.echo(
            f"\r{self.label} [{bar}] {step}/{total}  {per:.2f} s/step  "
            f"ETA {per * (total - step):.0f} s",
            err=True,
            nl=step == total,
        )


@app.command()
def generate(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="What to draw")],
    model: Annotated[str, typer.Option(help="Converted or diffusers folder, or hub repo id")] = (
        "Qwen/Qwen-Image"
    ),
    negative_prompt: Annotated[str, typer.Option(help="Negative prompt (true CFG)")] = " ",
    steps: Annotated[int, typer.Option(help="Denoising steps")] = 50,
    cfg: Annotated[float, typer.Option(help="True CFG scale (<= 1 disables CFG)")] = 4.0,
    seed: Annotated[
        list[int] | None, typer.Option(help="Seed; repeat for several images; none = random")
    ] = None,
    width: Annotated[int | None, typer.Option(help="Width in pixels (multiple of 16)")] = None,
    height: Annotated[int | None, typer.Option(help="Height in pixels (multiple of 16)")] = None,
    aspect: Annotated[
        str | None, typer.Option(help=f"Official preset: {', '.join(ASPECTS)}")
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="PNG path")] = None,
    precision: Annotated[
        str | None,
        typer.Option(help="Override the stored plan: fp32, bf16, fp16, mixed, auto (this Mac)"),
    ] = None,
    max_sequence_length: Annotated[int, typer.Option(help="Prompt token limit")] = 512,
    low_memory: Annotated[bool, typer.Option(help="Free the transformer before decoding")] = False,
) -> None:
    """Generate images from a prompt; every PNG carries its parameters."""
    import mlx.core as mx
    import numpy as np

    from . import __version__
    from .pipeline import QwenImagePipeline, check_size, random_seed, to_pil

    with user_errors():
        if aspect is not None:
            if aspect not in ASPECTS:
                raise UserError(f"unknown aspect {aspect!r}; choose one of {', '.join(ASPECTS)}")
            if width is not None or height is not None:
                raise UserError("give either --aspect or --width/--height, not both")
            width, height = ASPECTS[aspect]
        width, height = width or 1024, height or 1024
        check_size(height, width)
        if steps < 1:
            raise UserError(f"--steps must be at least 1, got {steps}")
        seeds = list(seed) if seed else [random_seed()]
        paths = output_paths(output, seeds)

        start = time.perf_counter()
        pipe = QwenImagePipeline.from_pretrained(model, precision=precision)

        def finish(s: int, path: Path, latents) -> None:
            image = to_pil(np.array(pipe.decode(latents, height, width)))[0]
            params = {
                "prompt": prompt,
                "negative_prompt": negative_prompt,
                "seed": s,
                "steps": steps,
                "cfg": cfg,
                "width": width,
                "height": height,
                "model": model,
                "precision": pipe.precision_name,
                "version": __version__,
            }
            save_png(image, path, params)
            typer.echo(f"wrote {path} (seed {s})")

        # Each component loads once and each prompt is encoded once for all seeds (the pipeline
        # caches prompt embeddings). With --low-memory every seed is sampled first, then the
        # transformer is freed and all images decoded.
        pending = []
        for s, path in zip(seeds, paths, strict=True):
            latents = pipe(
                prompt,
                negative_prompt=negative_prompt,
                width=width,
                height=height,
                num_inference_steps=steps,
                true_cfg_scale=cfg,
                seed=s,
                max_sequence_length=max_sequence_length,
                callback=Progress(f"seed {s}"),
                output_type="latent",
            )
            if low_memory:
                pending.append((s, path, latents))
            else:
                finish(s, path, latents)
        if pending:
            pipe.free("transformer")
            for s, path, latents in pending:
                finish(s, path, latents)
        elapsed = time.perf_counter() - start
        typer.echo(
            f"{len(seeds)} image(s) {width}x{height}, {steps} steps in {elapsed:.1f} s, "
            f"peak memory {mx.get_peak_memory() / 2**30:.2f} GiB"
        )


@app.command()
def info(
    model: Annotated[str, typer.Argument(help="Converted or diffusers folder, or hub repo id")],
) -> None:
    """Components, parameter counts, dtypes and estimated memory of a model."""
    from .io import parameter_counts
    from .loading import resolve

    with user_errors():
        source = resolve(model)
        typer.echo(f"model: {model}  ({'converted' if source.converted else 'diffusers layout'})")
        typer.echo(f"folder: {source.root}")
        sizes = {}
        for name in ("text_encoder", "transformer", "vae"):
            if not source.has(name):
                typer.echo(f"  {name:13s} missing")
                continue
            params, nbytes, dtypes = parameter_counts(source.root / name)
            sizes[name] = nbytes
            kinds = ", ".join(f"{k} {v / params:.0%}" for k, v in sorted(dtypes.items()))
            typer.echo(
                f"  {name:13s} {params / 1e9:7.3f} B params  {nbytes / 2**30:7.2f} GiB  [{kinds}]"
            )
        if source.has("transformer"):
            from .device import auto_precision
            from .precision import PrecisionPlan

            config = source.config("transformer")
            if source.converted:
                plan = PrecisionPlan.from_config(config, int(config.get("num_layers", 60)))
                typer.echo(f"precision plan: {plan.describe()}")
            name, why = auto_precision()
            typer.echo(f"auto precision on this machine: {name} ({why})")
        # The text encoder is freed before denoising: peak = the larger of the two phases.
        peak = max(sizes.get("text_encoder", 0), sizes.get("transformer", 0) + sizes.get("vae", 0))
        typer.echo(f"estimated peak weight memory: {peak / 2**30:.2f} GiB (plus activations)")


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())
