"""``qwen-mlx info``: components, parameters, dtypes and the memory plan, from headers only."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from qwen_mlx.cli.common import UserError, user_errors


def register(app: typer.Typer) -> None:
    app.command()(info)


def tensor_counts(tensors: dict) -> tuple[int, int, dict[str, int]]:
    """(parameters, bytes, {dtype: parameters}) of {name: TensorInfo} (hub headers)."""
    dtypes: dict[str, int] = {}
    for t in tensors.values():
        dtypes[t.dtype] = dtypes.get(t.dtype, 0) + t.size
    return sum(dtypes.values()), sum(t.nbytes for t in tensors.values()), dtypes


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
    processes: Annotated[
        int, typer.Option(help="Estimate one process of an mlx.launch job of this many")
    ] = 1,
    parallel: Annotated[
        str, typer.Option(help="With --processes: how the job splits (cfg, seeds, tensor)")
    ] = "tensor",
) -> None:
    """Components, parameter counts, dtypes and estimated peak memory of a model (from the
    safetensors headers: nothing is loaded, downloaded or converted)."""
    from qwen_mlx import memory
    from qwen_mlx.checks import check_size
    from qwen_mlx.io import parameter_counts
    from qwen_mlx.loading import is_hub_id, resolve

    with user_errors():
        check_size(height, width)
        from qwen_mlx.quantize import check_bits, text_encoder_bits

        if quantize is not None:
            check_bits(quantize)
        te_bits = text_encoder_bits(quantize_text_encoder, quantize)
        if processes < 1 or processes > 64:
            raise UserError(f"--processes must be in 1-64, got {processes}")
        if parallel not in ("cfg", "seeds", "tensor"):
            raise UserError(f"--parallel must be cfg, seeds or tensor, got {parallel!r}")
        request = memory.Request(
            width,
            height,
            cfg=cfg,
            precision=precision,
            low_memory=low_memory,
            quant_bits=quantize,
            adaln_cache=adaln_cache,
            text_encoder_bits=te_bits,
            split=parallel if processes > 1 else None,
            processes=processes,
        )
        if is_hub_id(model) and not Path(model).expanduser().exists():
            from qwen_mlx.remote import hub_headers

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
            from qwen_mlx.precision import PrecisionPlan

            config = source.config("transformer")
            if source.converted:
                plan = PrecisionPlan.from_config(config, int(config.get("num_layers", 60)))
                typer.echo(f"precision plan: {plan.describe()}")
        from qwen_mlx.device import auto_precision

        name, why = auto_precision()
        typer.echo(f"auto precision on this machine: {name} ({why})")
        if source is not None:
            tensors, configs, load_dtype = memory.source_inputs(source)
        if processes > 1:  # the job's own checks (several seeds assumed for seeds)
            from qwen_mlx.distributed import check_tensor_parallel, choose_mode

            config = configs.get("transformer", {})
            try:
                choose_mode(parallel, processes, fits=True, true_cfg=cfg, seeds=2, config=config)
                if parallel == "tensor":
                    check_tensor_parallel(config, processes, quantize)
            except ValueError as e:
                raise UserError(str(e)) from None
        quantized = quantize or "quantization" in configs.get("transformer", {})
        if quantized:
            request = dataclasses.replace(request, vae_tile=memory.LEAN_DECODE_TILE)
        auto = quantize_text_encoder == "auto"
        check = memory.check(tensors, request, configs, load_dtype, text_encoder_auto=auto)
        for line in stage_lines(check.estimate):
            typer.echo(line)
        typer.echo(
            f"estimated peak memory at {width}x{height}: {check.estimate.describe()}; "
            f"this machine: {memory.gib(check.limit)} ({check.where})"
        )
        if not check.fits:
            typer.echo("does not fit; " + "\n".join(check.advice_lines()))


def stage_lines(est) -> list[str]:
    """Each stage's expected memory (weights held + activations)."""
    from qwen_mlx import memory

    return [
        f"  {stage:8s} {memory.gib(total):>9s}  (activations "
        f"{memory.gib(est.activations.get(stage, 0))})"
        for stage, total in est.stages.items()
    ]


def memory_lines(source, request, text_encoder_auto: bool = True) -> tuple[list[str], bool]:
    """What ``--dry-run`` prints (the run's settings, each stage, the peak, what would fit)
    and whether the plan fits this machine. ``text_encoder_auto``: ``--quantize-text-encoder``
    is auto (the advice's ``--quantize`` then prices an 8-bit language model)."""
    from qwen_mlx import memory

    check = memory.source_check(source, request, text_encoder_auto)
    what = (
        f"memory plan for {request.width}x{request.height}{', true CFG' if request.cfg else ''}:"
        f" transformer {f'{request.quant_bits}-bit' if request.quant_bits else 'as stored'}"
        f"{', adaLN cache' if request.adaln_cache else ''}; text encoder "
        f"{f'{request.text_encoder_bits}-bit' if request.text_encoder_bits else 'as stored'}"
    )
    if request.controlnet_weights:
        what += f"; ControlNet {memory.gib(request.controlnet_weights)}"
    if request.split:
        what += f"; one process of {request.processes} (--parallel {request.split})"
    return [what, *check.lines()], check.fits
