"""``qwen-mlx generate`` and ``qwen-mlx edit``: one path from options to PNGs.

Both build a ``GenerationRequest``, check everything that can be checked before any weight
loads (options, inputs, outputs, the memory plan), then consume ``pipe.generate(request)``:
its ``StepEvent``s drive the progress bar, its ``ImageResult``s become PNGs with metadata.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from qwen_mlx.cli.common import (
    ASPECTS,
    AdalnOpt,
    CacheCalibrateOpt,
    CacheOpt,
    CfgOpt,
    DryRunOpt,
    HeightOpt,
    IgnoreMemoryOpt,
    LightningOpt,
    LoraOpt,
    LowMemoryOpt,
    MaxSeqOpt,
    ModelOpt,
    NegativeOpt,
    OutputOpt,
    OverwriteOpt,
    ParallelOpt,
    PrecisionOpt,
    QuantizeOpt,
    QuantizeTextOpt,
    SeedOpt,
    StepsOpt,
    UserError,
    WidthOpt,
    parse_lora,
    user_errors,
)
from qwen_mlx.messages import ignored_memory_limit


def register(app: typer.Typer) -> None:
    app.command()(generate)
    app.command()(edit)


# The request's fields as this CLI spells them, for its error messages.
FLAGS = {
    "steps": "--steps",
    "seeds": "--seed",
    "max_sequence_length": "--max-sequence-length",
    "strength": "--strength",
    "width": "width",
    "height": "height",
    "control_scale": "--control-scale",
    "control_start": "--control-start",
    "control_end": "--control-end",
    "control_mask": "--control-mask",
    "control_preprocess": "--control-preprocess",
}

ControlNetOpt = Annotated[
    str | None,
    typer.Option(
        help="ControlNet: a QwenImageControlNetModel folder (diffusers or converted) or hub id"
    ),
]
ControlImageOpt = Annotated[
    list[Path] | None,
    typer.Option(help="With --controlnet: the control image; repeat for several conditions"),
]
ControlScaleOpt = Annotated[float, typer.Option(help="ControlNet conditioning scale")]
ControlStartOpt = Annotated[
    float, typer.Option(help="Fraction of the steps before the ControlNet starts")
]
ControlEndOpt = Annotated[float, typer.Option(help="Fraction of the steps where it stops")]
ControlMaskOpt = Annotated[
    Path | None, typer.Option(help="Inpainting ControlNet: the mask, white = repaint")
]
ControlPreprocessOpt = Annotated[
    str | None,
    typer.Option(help="Preprocess --control-image first: canny (needs qwen-mlx[control])"),
]


def output_paths(output: Path | None, seeds: list[int], stem: str = "qwen-image") -> list[Path]:
    """One PNG per seed: OUTPUT as given for one seed, OUTPUT-<seed>.png for several."""
    if output is None:
        return [Path(f"{stem}-{s}.png") for s in seeds]
    if output.suffix.lower() != ".png":
        raise UserError(f"--output must end in .png, got {output}")
    if len(seeds) == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{s}{output.suffix}") for s in seeds]


def _size(aspect: str | None, width: int | None, height: int | None):
    if aspect is None:
        return width, height
    if aspect not in ASPECTS:
        raise UserError(f"unknown aspect {aspect!r}; choose one of {', '.join(ASPECTS)}")
    if width is not None or height is not None:
        raise UserError("give either --aspect or --width/--height, not both")
    return ASPECTS[aspect]


def _lightning(lightning: int | None, steps: int | None, cfg: float | None) -> None:
    from qwen_mlx.pipelines.txt2img import LIGHTNING_STEPS

    if lightning is None:
        return
    if lightning not in LIGHTNING_STEPS:
        raise UserError(f"--lightning must be 4 or 8 (the LoRA's steps), got {lightning}")
    if steps is not None or cfg is not None:
        raise UserError(f"--lightning {lightning} sets the steps and CFG; drop --steps/--cfg")


def run(
    pipeline_cls,
    request,
    *,
    model: str,
    stem: str,
    output: Path | None,
    overwrite: bool,
    dry_run: bool,
    ignore_memory_limit: bool,
    lora: list[str] | None,
    precision: str | None,
    quantize: int | None,
    quantize_text_encoder: str,
    adaln_cache: bool,
    lightning: int | None,
    inputs: list[tuple[str, Path]],
    controlnet: str | None = None,
    parallel: str = "auto",
    cache: str | None = None,
    cache_calibrate: bool = False,
) -> None:
    """The shared path of ``generate`` and ``edit``: checks, load, sample, save.

    Under ``mlx.launch`` every process runs it: they check the options as one (rank 0's
    random seed for all), rank 0 alone checks and writes the outputs and prints."""
    from qwen_mlx import memory
    from qwen_mlx.distributed import World, check_parallel, launched
    from qwen_mlx.outputs import check_not_inputs, check_outputs
    from qwen_mlx.pipelines.txt2img import random_seed
    from qwen_mlx.progress import Progress
    from qwen_mlx.quantize import check_bits, text_encoder_bits
    from qwen_mlx.request import ImageResult
    from qwen_mlx.step_cache import describe, parse_spec

    start = time.perf_counter()
    check_parallel(parallel)
    world = World.init() if launched() else World(None)
    request = request.replace(seeds=request.seeds or (random_seed(),))
    request = request.replace(seeds=tuple(world.broadcast_json(list(request.seeds))))
    with world.agree("checking the options"):
        request = request.validate(FLAGS)
        loras = [parse_lora(spec) for spec in lora or []]  # files found, scales numbers
        cache_config = parse_spec(cache, cache_calibrate)
        paths = output_paths(output, list(request.seeds), stem)
        check_not_inputs(paths, inputs)  # even with --overwrite; links and ./ spellings count
        if not dry_run and world.is_main:  # rank 0 writes every file
            check_outputs(paths, overwrite)
        if quantize is not None:
            check_bits(quantize)
        te_bits = text_encoder_bits(quantize_text_encoder, quantize)

        pipe = pipeline_cls.from_pretrained(
            model,
            precision=precision,
            quantize=quantize,
            quantize_text_encoder=te_bits or "none",
            adaln_cache=adaln_cache,
            lightning=lightning,
            parallel=parallel if world.distributed else None,
        )
        if controlnet is not None:  # checked against the transformer from the configs
            pipe.load_controlnet(controlnet)
        if cache_config is not None:
            pipe.enable_cache(cache_config)
        request = pipe.prepare(request)  # sizes, images, shapes: before any weight loads
    if dry_run and not world.is_main:
        return
    if dry_run:
        from qwen_mlx.cli.info import memory_lines

        auto = quantize_text_encoder == "auto"
        parallel_plan = {}
        if world.distributed:  # rank 0's share of the job in the mode it would run
            from qwen_mlx.distributed import job_mode

            parallel_plan = dict(split=job_mode(pipe, request, world.size), processes=world.size)
        lines, fits = memory_lines(pipe.source, pipe.memory_request(request, **parallel_plan), auto)
        for line in lines:
            typer.echo(line)
        typer.echo(
            f"dry run: {len(request.seeds)} image(s) {request.width}x{request.height}, "
            f"{request.steps} steps; nothing loaded or written"
        )
        if not fits:
            raise typer.Exit(2)
        return
    with world.agree("checking memory and LoRAs"):
        try:
            # several processes: the job checks each process's share once it knows the mode
            # (distributed.check_job_memory)
            if not world.distributed:
                pipe.check_memory(request)
        except memory.MemoryLimitError as e:
            if not ignore_memory_limit:
                raise
            typer.echo(ignored_memory_limit(e), err=True)
        pipe.memory_guard = not ignore_memory_limit
        for path, scale in loras:
            pipe.load_lora(path, scale)  # checked against the transformer's shapes here

    where = dict(zip(request.seeds, paths, strict=True))
    misplaced, passes = [], []
    with Progress() as progress:  # rich on a terminal, plain lines otherwise
        for event in pipe.generate(request):
            if isinstance(event, ImageResult):
                _save(event, where[event.seed], overwrite, misplaced)
                meta = event.metadata
                if meta.get("cache"):
                    passes.append(f"{meta['cache_full_passes']}/{meta['cache_passes']}")
            else:
                progress.step(event)  # "seed N": steps, seconds per step, time left
    elapsed = time.perf_counter() - start
    import mlx.core as mx

    if not world.is_main:
        return
    typer.echo(
        f"{len(request.seeds)} image(s) {request.width}x{request.height}, {request.steps} steps "
        f"in {elapsed:.1f} s, peak memory {mx.get_peak_memory() / 2**30:.2f} GiB"
        + (f", cache {describe(cache_config)}: {', '.join(passes)} full passes" if passes else "")
    )
    if pipe.last_calibration is not None:
        typer.echo(f"MagCache ratios stored in {pipe.last_calibration}")
    if misplaced:
        raise typer.Exit(1)  # every image is saved, but not all where asked


def _save(result, path: Path, overwrite: bool, misplaced: list) -> None:
    from qwen_mlx.png import save_png

    written, why = save_png(result.image, path, result.metadata, overwrite)
    if why:
        misplaced.append(written)
        typer.echo(f"warning: {why}; saved the image as {written} instead", err=True)
    typer.echo(f"wrote {written} (seed {result.seed})")


def generate(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="What to draw")],
    model: ModelOpt = "Qwen/Qwen-Image",
    negative_prompt: NegativeOpt = " ",
    steps: Annotated[int | None, typer.Option(help="Denoising steps [default: 50]")] = None,
    cfg: CfgOpt = None,
    seed: SeedOpt = None,
    width: WidthOpt = None,
    height: HeightOpt = None,
    aspect: Annotated[
        str | None, typer.Option(help=f"Official preset: {', '.join(ASPECTS)}")
    ] = None,
    output: OutputOpt = None,
    precision: PrecisionOpt = None,
    max_sequence_length: MaxSeqOpt = 512,
    low_memory: LowMemoryOpt = False,
    overwrite: OverwriteOpt = False,
    ignore_memory_limit: IgnoreMemoryOpt = False,
    lora: LoraOpt = None,
    lightning: LightningOpt = None,
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
    quantize: QuantizeOpt = None,
    quantize_text_encoder: QuantizeTextOpt = "auto",
    adaln_cache: AdalnOpt = True,
    cache: CacheOpt = None,
    cache_calibrate: CacheCalibrateOpt = False,
    dry_run: DryRunOpt = False,
    controlnet: ControlNetOpt = None,
    control_image: ControlImageOpt = None,
    control_scale: ControlScaleOpt = 1.0,
    control_start: ControlStartOpt = 0.0,
    control_end: ControlEndOpt = 1.0,
    control_mask: ControlMaskOpt = None,
    control_preprocess: ControlPreprocessOpt = None,
    parallel: ParallelOpt = "auto",
) -> None:
    """Generate images from a prompt; every PNG carries its parameters."""
    from qwen_mlx.pipelines.txt2img import QwenImagePipeline
    from qwen_mlx.request import GenerationRequest

    with user_errors():
        width, height = _size(aspect, width, height)
        _lightning(lightning, steps, cfg)
        if image is None and (strength is not None or mask is not None):
            raise UserError("--strength and --mask need --image")
        if controlnet is None and (control_image or control_mask or control_preprocess):
            raise UserError(
                "--control-image, --control-mask and --control-preprocess need --controlnet"
            )
        if controlnet is not None and not control_image:
            raise UserError("--controlnet needs --control-image")
        if image is None:  # txt2img: the size is known before anything loads
            width = 1024 if width is None else width
            height = 1024 if height is None else height
        request = GenerationRequest(
            prompt=prompt,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            steps=steps,
            cfg=cfg,
            seeds=tuple(seed or ()),
            max_sequence_length=max_sequence_length,
            images=(image,) if image is not None else (),
            mask=mask,
            strength=strength,
            low_memory=low_memory,
            control_images=tuple(control_image or ()),
            control_scale=control_scale,
            control_start=control_start,
            control_end=control_end,
            control_mask=control_mask,
            control_preprocess=control_preprocess,
        )
        run(
            QwenImagePipeline,
            request,
            model=model,
            stem="qwen-image",
            output=output,
            overwrite=overwrite,
            dry_run=dry_run,
            ignore_memory_limit=ignore_memory_limit,
            lora=lora,
            precision=precision,
            quantize=quantize,
            quantize_text_encoder=quantize_text_encoder,
            adaln_cache=adaln_cache,
            lightning=lightning,
            cache=cache,
            cache_calibrate=cache_calibrate,
            inputs=[
                ("--image", image),
                ("--mask", mask),
                ("--control-mask", control_mask),
                *(("--control-image", p) for p in control_image or ()),
            ],
            controlnet=controlnet,
            parallel=parallel,
        )


def edit(
    image: Annotated[
        list[Path], typer.Option("--image", "-i", help="Input image; repeat for several (2509+)")
    ],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The edit instruction")],
    model: ModelOpt = "Qwen/Qwen-Image-Edit-2511",
    negative_prompt: NegativeOpt = " ",
    steps: StepsOpt = None,
    cfg: CfgOpt = None,
    seed: SeedOpt = None,
    width: WidthOpt = None,
    height: HeightOpt = None,
    aspect: Annotated[
        str | None, typer.Option(help=f"Official preset: {', '.join(ASPECTS)}")
    ] = None,
    output: OutputOpt = None,
    precision: PrecisionOpt = None,
    low_memory: LowMemoryOpt = False,
    overwrite: OverwriteOpt = False,
    ignore_memory_limit: IgnoreMemoryOpt = False,
    lora: LoraOpt = None,
    lightning: LightningOpt = None,
    quantize: QuantizeOpt = None,
    quantize_text_encoder: QuantizeTextOpt = "auto",
    adaln_cache: AdalnOpt = True,
    cache: CacheOpt = None,
    cache_calibrate: CacheCalibrateOpt = False,
    dry_run: DryRunOpt = False,
    parallel: ParallelOpt = "auto",
) -> None:
    """Edit images with Qwen-Image-Edit (2509/2511: several images); the output is about
    1024x1024 pixels at the (last) input image's aspect unless --width/--height say otherwise.
    Every PNG carries its parameters and the input images' names and sizes."""
    from qwen_mlx.pipelines.edit import QwenImageEditPipeline
    from qwen_mlx.request import GenerationRequest

    with user_errors():
        width, height = _size(aspect, width, height)
        _lightning(lightning, steps, cfg)
        request = GenerationRequest(
            prompt=prompt,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            steps=steps,
            cfg=cfg,
            seeds=tuple(seed or ()),
            images=tuple(image),
            low_memory=low_memory,
        )
        run(
            QwenImageEditPipeline,
            request,
            model=model,
            stem="qwen-image-edit",
            output=output,
            overwrite=overwrite,
            dry_run=dry_run,
            ignore_memory_limit=ignore_memory_limit,
            lora=lora,
            precision=precision,
            quantize=quantize,
            quantize_text_encoder=quantize_text_encoder,
            adaln_cache=adaln_cache,
            lightning=lightning,
            cache=cache,
            cache_calibrate=cache_calibrate,
            inputs=[("--image", p) for p in image],
            parallel=parallel,
        )
