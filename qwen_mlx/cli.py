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
    force: Annotated[bool, typer.Option(help="Overwrite DST if it exists")] = False,
) -> None:
    """Convert a Qwen-Image checkpoint to MLX (runs on any machine with MLX, no GPU needed)."""
    from qwen_mlx.convert import ConvertOptions, convert_checkpoint

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
        out = convert_checkpoint(
            src, dst, options, force=force, log=lambda m: typer.echo(m, err=True)
        )
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


def output_paths(output: Path | None, seeds: list[int], stem: str = "qwen-image") -> list[Path]:
    """One PNG per seed: OUTPUT as given for one seed, OUTPUT-<seed>.png for several."""
    if output is None:
        return [Path(f"{stem}-{s}.png") for s in seeds]
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
    if params.get("images"):
        a1111 += ", Edit images: " + "; ".join(
            f"{im['file']} ({im['width']}x{im['height']})" for im in params["images"]
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


# Options shared by `generate` and `edit` (defaults stay in each command's signature).
ModelOpt = Annotated[str, typer.Option(help="Converted or diffusers folder, or hub repo id")]
NegativeOpt = Annotated[str, typer.Option(help="Negative prompt (true CFG)")]
CfgOpt = Annotated[float, typer.Option(help="True CFG scale (<= 1 disables CFG)")]
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


def check_steps(steps: int | None) -> None:
    if steps is not None and steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")


def run_seeds(
    pipe,
    seeds: list[int],
    paths: list[Path],
    sample,
    size: tuple[int, int],
    params: dict,
    low_memory: bool,
) -> None:
    """Sample every seed with ``sample(seed, callback) -> latents``, decode, and save each PNG
    with ``params`` (plus seed, size, precision, version).

    Each component loads once and each prompt is encoded once for all seeds (the pipeline
    caches prompt embeddings). With ``low_memory`` every seed is sampled first, then the
    transformer is freed and all images decoded.
    """
    import mlx.core as mx
    import numpy as np

    from . import __version__
    from .pipeline import to_pil

    start = time.perf_counter()
    height, width = size

    def finish(s: int, path: Path, latents) -> None:
        image = to_pil(np.array(pipe.decode(latents, height, width)))[0]
        meta = dict(params, seed=s, width=width, height=height)
        meta.update(precision=pipe.precision_name, version=__version__)
        save_png(image, path, meta)
        typer.echo(f"wrote {path} (seed {s})")

    pending = []
    for s, path in zip(seeds, paths, strict=True):
        latents = sample(s, Progress(f"seed {s}"))
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
        f"{len(seeds)} image(s) {width}x{height}, {params['steps']} steps in {elapsed:.1f} s, "
        f"peak memory {mx.get_peak_memory() / 2**30:.2f} GiB"
    )


@app.command()
def generate(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="What to draw")],
    model: ModelOpt = "Qwen/Qwen-Image",
    negative_prompt: NegativeOpt = " ",
    steps: Annotated[int, typer.Option(help="Denoising steps")] = 50,
    cfg: CfgOpt = 4.0,
    seed: SeedOpt = None,
    width: WidthOpt = None,
    height: HeightOpt = None,
    aspect: Annotated[
        str | None, typer.Option(help=f"Official preset: {', '.join(ASPECTS)}")
    ] = None,
    output: OutputOpt = None,
    precision: PrecisionOpt = None,
    max_sequence_length: Annotated[int, typer.Option(help="Prompt token limit")] = 512,
    low_memory: LowMemoryOpt = False,
) -> None:
    """Generate images from a prompt; every PNG carries its parameters."""
    from .pipeline import QwenImagePipeline, check_size, random_seed

    with user_errors():
        if aspect is not None:
            if aspect not in ASPECTS:
                raise UserError(f"unknown aspect {aspect!r}; choose one of {', '.join(ASPECTS)}")
            if width is not None or height is not None:
                raise UserError("give either --aspect or --width/--height, not both")
            width, height = ASPECTS[aspect]
        width, height = width or 1024, height or 1024
        check_size(height, width)
        check_steps(steps)
        seeds = list(seed) if seed else [random_seed()]
        paths = output_paths(output, seeds)

        pipe = QwenImagePipeline.from_pretrained(model, precision=precision)

        def sample(s: int, callback):
            return pipe(
                prompt,
                negative_prompt=negative_prompt,
                width=width,
                height=height,
                num_inference_steps=steps,
                true_cfg_scale=cfg,
                seed=s,
                max_sequence_length=max_sequence_length,
                callback=callback,
                output_type="latent",
            )

        params = {"prompt": prompt, "negative_prompt": negative_prompt, "steps": steps}
        params.update(cfg=cfg, model=model)
        run_seeds(pipe, seeds, paths, sample, (height, width), params, low_memory)


def read_images(files: list[Path]) -> list:
    """Open every input image up front: a missing or unreadable one is a one-line error."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                images.append(im.copy())
        except (OSError, UnidentifiedImageError) as e:
            raise UserError(f"cannot read image {f}: {e}") from None
    return images


@app.command()
def edit(
    image: Annotated[
        list[Path], typer.Option("--image", "-i", help="Input image; repeat for several (2509+)")
    ],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The edit instruction")],
    model: ModelOpt = "Qwen/Qwen-Image-Edit-2511",
    negative_prompt: NegativeOpt = " ",
    steps: Annotated[
        int | None, typer.Option(help="Denoising steps (default: Edit 50, 2509/2511 40)")
    ] = None,
    cfg: CfgOpt = 4.0,
    seed: SeedOpt = None,
    width: WidthOpt = None,
    height: HeightOpt = None,
    output: OutputOpt = None,
    precision: PrecisionOpt = None,
    low_memory: LowMemoryOpt = False,
) -> None:
    """Edit images with Qwen-Image-Edit (2509/2511: several images); the output is about
    1024x1024 pixels at the (last) input image's aspect unless --width/--height say otherwise.
    Every PNG carries its parameters and the input images' names and sizes."""
    from .edit_pipeline import QwenImageEditPipeline
    from .pipeline import random_seed

    with user_errors():
        check_steps(steps)
        images = read_images(image)
        seeds = list(seed) if seed else [random_seed()]
        paths = output_paths(output, seeds, stem="qwen-image-edit")
        inputs = {f.resolve() for f in image}
        clash = [p for p in paths if p.resolve() in inputs]
        if clash:
            raise UserError(f"--output {clash[0]} would overwrite an input image")

        pipe = QwenImageEditPipeline.from_pretrained(model, precision=precision)
        if not pipe.plus and len(images) != 1:
            raise UserError(f"{model} is Qwen-Image-Edit: it takes one --image ({len(images)})")
        size = pipe.edit_size(images, height, width)
        steps = steps or pipe.default_steps

        def sample(s: int, callback):
            return pipe(
                images if pipe.plus else images[0],
                prompt,
                negative_prompt=negative_prompt,
                num_inference_steps=steps,
                true_cfg_scale=cfg,
                seed=s,
                height=size[0],
                width=size[1],
                callback=callback,
                output_type="latent",
            )

        params = {"prompt": prompt, "negative_prompt": negative_prompt, "steps": steps}
        params.update(cfg=cfg, model=model, flavour=pipe.flavour)
        params["images"] = [
            {"file": f.name, "width": im.width, "height": im.height}
            for f, im in zip(image, images, strict=True)
        ]
        run_seeds(pipe, seeds, paths, sample, size, params, low_memory)


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
