"""The ``qwen-mlx`` command line."""

from __future__ import annotations

import dataclasses
import os
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


DEBUG_ENV = "QWEN_MLX_DEBUG"  # =1: let tracebacks through


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


@contextmanager
def user_errors():
    """Turn every failure into a one-line message, never a traceback (``QWEN_MLX_DEBUG=1``
    shows it): exit code 2 for what the user can fix (input, files, memory), 1 for anything
    unexpected, 130 for Ctrl-C."""
    from qwen_mlx.errors import QwenMLXError

    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        yield
    except typer.Exit:
        raise
    except (UserError, QwenMLXError, ValueError, OSError, MemoryError, OverflowError) as e:
        if debug:
            raise
        typer.echo(f"error: {one_line(e)}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        if debug:
            raise
        typer.echo("error: interrupted", err=True)
        raise typer.Exit(130) from None
    except Exception as e:  # noqa: BLE001 - the last line of defence
        if debug:
            raise
        typer.echo(
            f"error: unexpected {type(e).__name__}: {one_line(e)} "
            f"({DEBUG_ENV}=1 shows the traceback)",
            err=True,
        )
        raise typer.Exit(1) from None


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
    quantize: Annotated[
        int | None,
        typer.Option(help="Store the transformer quantized: 4 or 8 bits (see the README)"),
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

    from .device import auto_precision
    from .quantize import text_encoder_bits

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
        try:
            out = convert_checkpoint(
                src, dst, options, force=force, log=lambda m: typer.echo(m, err=True)
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


def save_png(image, path: Path, params: dict, overwrite: bool = False) -> tuple[Path, str | None]:
    """Write with the generation parameters (A1111 text + JSON chunks), never clobbering a file
    unless ``overwrite``: returns (where it was written, why not ``path`` or None); see
    ``qwen_mlx.outputs``."""
    import json

    from PIL.PngImagePlugin import PngInfo

    from .outputs import save_exclusive

    info = PngInfo()
    extra = ""
    if params.get("lightning"):
        extra += f"Lightning: {params['lightning']} steps, "
    if params.get("loras"):
        loras = " ".join(f"{x['name']}:{x['scale']:g}" for x in params["loras"])
        extra += f"LoRAs: {loras}, "
    if params.get("image"):
        extra += f"Denoising strength: {params['strength']}, "
        extra += "Mode: inpaint, " if params.get("mask") else "Mode: img2img, "
    a1111 = (
        f"{params['prompt']}\nNegative prompt: {params['negative_prompt'] or ''}\n"
        f"Steps: {params['steps']}, Sampler: FlowMatchEuler, CFG scale: {params['cfg']}, "
        f"Seed: {params['seed']}, Size: {params['width']}x{params['height']}, {extra}"
        f"Model: {params['model']}, Precision: {params['precision']}, "
        f"Version: qwen-mlx {params['version']}"
    )
    if params.get("images"):
        a1111 += ", Edit images: " + "; ".join(
            f"{im['file']} ({im['width']}x{im['height']})" for im in params["images"]
        )
    info.add_text("parameters", a1111)
    info.add_text("qwen_mlx", json.dumps(params, ensure_ascii=False, allow_nan=False))
    return save_exclusive(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info), overwrite)


def parse_lora(spec: str) -> tuple[Path, float]:
    """``PATH[:SCALE]`` -> (path, scale); a suffix that is not a number belongs to the path."""
    path, sep, scale = spec.rpartition(":")
    if sep:
        try:
            return Path(path), float(scale)
        except ValueError:
            pass
    return Path(spec), 1.0


LIGHTNING_STEPS = (4, 8)


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


def run_seeds(
    pipe,
    seeds: list[int],
    paths: list[Path],
    sample,
    size: tuple[int, int],
    params: dict,
    low_memory: bool,
    overwrite: bool,
    start: float,
) -> None:
    """Sample every seed with ``sample(seed, callback) -> latents``, decode, and save each PNG
    with ``params`` (plus seed, size, precision, version); shared by generate and edit.

    Each component loads once and each prompt is encoded once for all seeds (the pipeline
    caches prompt embeddings). With ``low_memory`` every seed is sampled first, then the
    transformer is freed and all images decoded.
    """
    import mlx.core as mx
    import numpy as np

    from . import __version__
    from .pipeline import to_pil

    height, width = size
    misplaced = []

    def finish(s: int, path: Path, latents) -> None:
        picture = to_pil(np.array(pipe.decode(latents, height, width)))[0]
        meta = dict(params, seed=s, width=width, height=height)
        meta.update(precision=pipe.precision_name, version=__version__)
        where, why = save_png(picture, path, meta, overwrite)
        if why:
            misplaced.append(where)
            typer.echo(f"warning: {why}; saved the image as {where} instead", err=True)
        typer.echo(f"wrote {where} (seed {s})")

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
    if misplaced:
        raise typer.Exit(1)  # every image is saved, but not all where asked


def check_memory(pipe, request, ignore_memory_limit: bool) -> None:
    """Refuse a run whose estimated peak exceeds this machine's memory (unless told to go on)."""
    from . import memory

    try:
        memory.check_source(pipe.source, request)
    except memory.MemoryLimitError as e:
        if not ignore_memory_limit:
            raise
        typer.echo(f"warning: {one_line(e)}; going ahead (--ignore-memory-limit)", err=True)


# Options shared by `generate` and `edit` (each command keeps its own defaults).
ModelOpt = Annotated[str, typer.Option(help="Converted or diffusers folder, or hub repo id")]
NegativeOpt = Annotated[str, typer.Option(help="Negative prompt (true CFG)")]
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


@app.command()
def generate(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="What to draw")],
    model: ModelOpt = "Qwen/Qwen-Image",
    negative_prompt: NegativeOpt = " ",
    steps: Annotated[int | None, typer.Option(help="Denoising steps [default: 50]")] = None,
    cfg: Annotated[
        float | None, typer.Option(help="True CFG scale (<= 1 disables CFG) [default: 4]")
    ] = None,
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
    overwrite: OverwriteOpt = False,
    ignore_memory_limit: IgnoreMemoryOpt = False,
    lora: LoraOpt = None,
    lightning: Annotated[
        int | None,
        typer.Option(
            help="Lightning preset for the 4- or 8-step Lightning LoRA (give it with --lora): "
            "its scheduler, that many steps, CFG 1"
        ),
    ] = None,
    image: Annotated[
        Path | None, typer.Option(help="Input image: img2img (size defaults to its own)")
    ] = None,
    strength: Annotated[
        float | None,
        typer.Option(help="With --image: how much to change it, 0-1 [default: 0.6]"),
    ] = None,
    mask: Annotated[
        Path | None, typer.Option(help="With --image: inpainting mask, white = repaint")
    ] = None,
    quantize: Annotated[
        int | None,
        typer.Option(help="Quantize a float transformer as it loads: 4 or 8 bits"),
    ] = None,
    quantize_text_encoder: Annotated[
        str, typer.Option(help="Language model: 4, 8, none, or auto (8 with --quantize)")
    ] = "auto",
    adaln_cache: Annotated[
        bool,
        typer.Option(
            "--adaln-cache/--no-adaln-cache",
            help="Precompute the modulation for the schedule (the transformer then loads "
            "without its 6.8 B modulation parameters); off computes it every step",
        ),
    ] = True,
    dry_run: Annotated[
        bool,
        typer.Option(help="Print the plan and the expected peak memory; load and write nothing"),
    ] = False,
) -> None:
    """Generate images from a prompt; every PNG carries its parameters."""

    from . import checks, memory
    from .img2img import as_pil
    from .outputs import check_outputs
    from .pipeline import QwenImagePipeline, check_size, random_seed
    from .quantize import check_bits, text_encoder_bits
    from .sampler import LIGHTNING_SCHEDULER

    with user_errors():
        if aspect is not None:
            if aspect not in ASPECTS:
                raise UserError(f"unknown aspect {aspect!r}; choose one of {', '.join(ASPECTS)}")
            if width is not None or height is not None:
                raise UserError("give either --aspect or --width/--height, not both")
            width, height = ASPECTS[aspect]
        if lightning is not None:
            if lightning not in LIGHTNING_STEPS:
                raise UserError(f"--lightning must be 4 or 8 (the LoRA's steps), got {lightning}")
            if steps is not None or cfg is not None:
                raise UserError(
                    f"--lightning {lightning} sets the steps and CFG; drop --steps/--cfg"
                )
            steps, cfg = lightning, 1.0
        steps = 50 if steps is None else steps
        cfg = 4.0 if cfg is None else cfg
        # Everything that can be checked is checked before anything loads.
        checks.check_steps(steps, name="--steps")
        checks.check_cfg(cfg)
        checks.check_int("--max-sequence-length", max_sequence_length, 1, 1024)
        if image is None and (strength is not None or mask is not None):
            raise UserError("--strength and --mask need --image")
        strength = 0.6 if strength is None else strength
        if not 0.0 <= strength <= 1.0:
            raise UserError(f"--strength must be in [0, 1], got {strength}")
        source = as_pil(image) if image is not None else None
        mask_image = as_pil(mask, "mask") if mask is not None else None
        if source is None:
            width = 1024 if width is None else width
            height = 1024 if height is None else height
            check_size(height, width)
        loras = [parse_lora(spec) for spec in lora or []]
        for path, _ in loras:
            if not path.is_file():
                raise UserError(f"LoRA file not found: {path}")
        seeds = checks.check_seeds(list(seed)) if seed else [random_seed()]
        if len(set(seeds)) != len(seeds):
            raise UserError("each --seed may be given once")
        paths = output_paths(output, seeds)
        if not dry_run:
            check_outputs(paths, overwrite)
        if quantize is not None:
            check_bits(quantize)
        te_bits = text_encoder_bits(quantize_text_encoder, quantize)

        start = time.perf_counter()
        pipe = QwenImagePipeline.from_pretrained(
            model,
            precision=precision,
            scheduler_overrides=LIGHTNING_SCHEDULER if lightning else None,
            quantize=quantize,
            quantize_text_encoder=te_bits or "none",
            adaln_cache=adaln_cache,
        )
        width, height = pipe.output_size(width, height, source)
        pipe.check_components()
        request = memory.Request(
            width=width,
            height=height,
            cfg=cfg > 1,
            max_sequence_length=max_sequence_length,
            low_memory=low_memory,
            precision=pipe.precision if isinstance(pipe.precision, str) else None,
            quant_bits=quantize,
            vae_tile=pipe.decode_tile_size or 128,
            adaln_cache=adaln_cache,
            text_encoder_bits=te_bits,
        )
        if dry_run:
            for line in memory_lines(pipe.source, request):
                typer.echo(line)
            typer.echo(
                f"dry run: {len(seeds)} image(s) {width}x{height}, {steps} steps; "
                "nothing loaded or written"
            )
            return
        check_memory(pipe, request, ignore_memory_limit)
        applied = [pipe.load_lora(path, scale) for path, scale in loras]  # checked here

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
                image=source,
                strength=strength,
                mask_image=mask_image,
            )

        params = {
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "steps": steps,
            "cfg": cfg,
            "model": model,
            "quantize": pipe.quantize,
            "adaln_cache": pipe.adaln_cache,
            "lightning": lightning,
            "loras": [
                {"name": x.name, "path": str(p), "scale": sc, "sha256": x.digest}
                for x, (p, sc) in zip(applied, loras, strict=True)
            ],
            "image": str(image) if image is not None else None,
            "strength": strength if image is not None else None,
            "mask": str(mask) if mask is not None else None,
        }
        run_seeds(pipe, seeds, paths, sample, (height, width), params, low_memory, overwrite, start)


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
    cfg: Annotated[float, typer.Option(help="True CFG scale (<= 1 disables CFG)")] = 4.0,
    seed: SeedOpt = None,
    width: WidthOpt = None,
    height: HeightOpt = None,
    output: OutputOpt = None,
    precision: PrecisionOpt = None,
    low_memory: LowMemoryOpt = False,
    overwrite: OverwriteOpt = False,
    ignore_memory_limit: IgnoreMemoryOpt = False,
    lora: LoraOpt = None,
) -> None:
    """Edit images with Qwen-Image-Edit (2509/2511: several images); the output is about
    1024x1024 pixels at the (last) input image's aspect unless --width/--height say otherwise.
    Every PNG carries its parameters and the input images' names and sizes."""
    from . import checks, memory
    from .edit_pipeline import QwenImageEditPipeline
    from .outputs import check_outputs
    from .pipeline import random_seed

    with user_errors():
        if steps is not None:
            checks.check_steps(steps, name="--steps")
        checks.check_cfg(cfg)
        images = read_images(image)
        loras = [parse_lora(spec) for spec in lora or []]
        for path, _ in loras:
            if not path.is_file():
                raise UserError(f"LoRA file not found: {path}")
        seeds = checks.check_seeds(list(seed)) if seed else [random_seed()]
        if len(set(seeds)) != len(seeds):
            raise UserError("each --seed may be given once")
        paths = output_paths(output, seeds, stem="qwen-image-edit")
        inputs = {f.resolve() for f in image}
        clash = [p for p in paths if p.resolve() in inputs]
        if clash:
            raise UserError(f"--output {clash[0]} would overwrite an input image")
        check_outputs(paths, overwrite)

        start = time.perf_counter()
        pipe = QwenImageEditPipeline.from_pretrained(model, precision=precision)
        if not pipe.plus and len(images) != 1:
            raise UserError(f"{model} is Qwen-Image-Edit: it takes one --image ({len(images)})")
        size = pipe.edit_size(images, height, width)
        steps = steps or pipe.default_steps
        pipe.check_components()
        request = memory.Request(
            width=size[1],
            height=size[0],
            cfg=cfg > 1,
            low_memory=low_memory,
            precision=pipe.precision if isinstance(pipe.precision, str) else None,
        )
        check_memory(pipe, request, ignore_memory_limit)
        applied = [pipe.load_lora(path, scale) for path, scale in loras]

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
        params["loras"] = [
            {"name": x.name, "path": str(p), "scale": sc, "sha256": x.digest}
            for x, (p, sc) in zip(applied, loras, strict=True)
        ]
        params["images"] = [
            {"file": f.name, "width": im.width, "height": im.height}
            for f, im in zip(image, images, strict=True)
        ]
        run_seeds(pipe, seeds, paths, sample, size, params, low_memory, overwrite, start)


def tensor_counts(tensors: dict) -> tuple[int, int, dict[str, int]]:
    """(parameters, bytes, {dtype: parameters}) of {name: TensorInfo} (hub headers)."""
    dtypes: dict[str, int] = {}
    for t in tensors.values():
        dtypes[t.dtype] = dtypes.get(t.dtype, 0) + t.size
    return sum(dtypes.values()), sum(t.nbytes for t in tensors.values()), dtypes


@app.command()
def info(
    model: Annotated[str, typer.Argument(help="Converted or diffusers folder, or hub repo id")],
    width: Annotated[int, typer.Option(help="Width for the memory estimate")] = 1024,
    height: Annotated[int, typer.Option(help="Height for the memory estimate")] = 1024,
    precision: Annotated[
        str | None, typer.Option(help="Precision plan for the memory estimate (default: stored)")
    ] = None,
    low_memory: Annotated[bool, typer.Option(help="Estimate with --low-memory")] = False,
    quantize: Annotated[
        int | None, typer.Option(help="Estimate quantizing the transformer at load: 4 or 8")
    ] = None,
    quantize_text_encoder: Annotated[
        str, typer.Option(help="Language model: 4, 8, none, or auto (8 with --quantize)")
    ] = "auto",
    adaln_cache: Annotated[
        bool, typer.Option("--adaln-cache/--no-adaln-cache", help="Estimate with the adaLN cache")
    ] = True,
    cfg: Annotated[bool, typer.Option("--cfg/--no-cfg", help="True CFG (doubled batch)")] = True,
) -> None:
    """Components, parameter counts, dtypes and estimated peak memory of a model (from the
    safetensors headers: nothing is loaded, downloaded or converted)."""
    from . import memory
    from .io import parameter_counts
    from .loading import is_hub_id, resolve
    from .pipeline import check_size

    with user_errors():
        check_size(height, width)
        from .quantize import check_bits, text_encoder_bits

        if quantize is not None:
            check_bits(quantize)
        te_bits = text_encoder_bits(quantize_text_encoder, quantize)
        request = memory.Request(
            width,
            height,
            cfg=cfg,
            precision=precision,
            low_memory=low_memory,
            quant_bits=quantize,
            adaln_cache=adaln_cache,
            text_encoder_bits=te_bits,
        )
        if is_hub_id(model) and not Path(model).expanduser().exists():
            from .remote import hub_headers

            tensors, configs = hub_headers(model)
            typer.echo(f"model: {model}  (hub, headers only: nothing downloaded or converted)")
            counts = {c: tensor_counts(t) for c, t in tensors.items()}
            source, load_dtype = None, "bfloat16"
        else:
            source = resolve(model)
            kind = "converted" if source.converted else "diffusers layout"
            typer.echo(f"model: {model}  ({kind})")
            typer.echo(f"folder: {source.root}")
            names = [c for c in memory.COMPONENTS if source.has(c)]
            counts = {c: parameter_counts(source.folder(c)) for c in names}
        for name in memory.COMPONENTS:
            if name not in counts:
                typer.echo(f"  {name:13s} missing")
                continue
            params, nbytes, dtypes = counts[name]
            kinds = ", ".join(f"{k} {v / max(params, 1):.0%}" for k, v in sorted(dtypes.items()))
            typer.echo(
                f"  {name:13s} {params / 1e9:7.3f} B params  {nbytes / 2**30:7.2f} GiB  [{kinds}]"
            )
        if source is not None and source.has("transformer"):
            from .precision import PrecisionPlan

            config = source.config("transformer")
            if source.converted:
                plan = PrecisionPlan.from_config(config, int(config.get("num_layers", 60)))
                typer.echo(f"precision plan: {plan.describe()}")
        from .device import auto_precision

        name, why = auto_precision()
        typer.echo(f"auto precision on this machine: {name} ({why})")
        if source is not None:
            tensors, configs, load_dtype = memory.source_inputs(source)
        quantized = quantize or "quantization" in configs.get("transformer", {})
        if quantized:
            request = dataclasses.replace(request, vae_tile=memory.LEAN_DECODE_TILE)
        est = memory.estimate(tensors, request, configs, load_dtype)
        limit, where = memory.machine_memory()
        for line in stage_lines(est):
            typer.echo(line)
        typer.echo(
            f"estimated peak memory at {width}x{height}: {est.describe()}; "
            f"this machine: {memory.gib(limit)} ({where})"
        )
        if est.peak > limit:
            fits = memory.alternatives(tensors, request, configs, limit, load_dtype)
            hint = "; ".join(f"{f.label} (~{memory.gib(f.peak)})" for f in fits) or "nothing"
            typer.echo(f"does not fit; would fit: {hint}")


def stage_lines(est) -> list[str]:
    """Each stage's expected memory (weights held + activations)."""
    from . import memory

    return [
        f"  {stage:8s} {memory.gib(total):>9s}  (activations "
        f"{memory.gib(est.activations.get(stage, 0))})"
        for stage, total in est.stages.items()
    ]


def memory_lines(source, request) -> list[str]:
    """What ``generate --dry-run`` prints: the run's settings, each stage, the peak."""
    from . import memory

    est = memory.source_estimate(source, request)
    limit, where = memory.machine_memory()
    what = (
        f"memory plan for {request.width}x{request.height}{', true CFG' if request.cfg else ''}:"
        f" transformer {f'{request.quant_bits}-bit' if request.quant_bits else 'as stored'}"
        f"{', adaLN cache' if request.adaln_cache else ''}; text encoder "
        f"{f'{request.text_encoder_bits}-bit' if request.text_encoder_bits else 'as stored'}"
    )
    fits = "fits" if est.peak <= limit else "does NOT fit"
    return [
        what,
        *stage_lines(est),
        f"expected peak: {est.describe()}; this machine: {memory.gib(limit)} ({where}): {fits}",
    ]


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())
