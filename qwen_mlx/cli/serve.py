"""``qwen-mlx serve``: the model resident behind the OpenAI Images and AUTOMATIC1111 APIs, with
a web page (``qwen_mlx.server``; needs the ``server`` extra)."""

from __future__ import annotations

from typing import Annotated

import typer

from qwen_mlx.cli.common import (
    AdalnOpt,
    LightningOpt,
    LoraOpt,
    ModelOpt,
    ParallelOpt,
    PrecisionOpt,
    QuantizeOpt,
    QuantizeTextOpt,
    UserError,
    parse_lora,
    user_errors,
)

DEFAULT_PORT = 7860  # A1111's (and Draw Things')


def register(app: typer.Typer) -> None:
    app.command()(serve)


def serve(
    model: ModelOpt = "Qwen/Qwen-Image",
    host: Annotated[
        str, typer.Option(help="Address to listen on; beyond loopback needs --api-key")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port")] = DEFAULT_PORT,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="QWEN_MLX_API_KEY", help="Require this key (Bearer or basic auth)"),
    ] = None,
    max_queue: Annotated[int, typer.Option(help="Jobs waiting behind the running one")] = 8,
    max_steps: Annotated[
        int | None, typer.Option(help="Most steps a request may ask [default: 1000]")
    ] = None,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body, MiB")] = 64,
    warm_up: Annotated[
        bool, typer.Option("--warm-up/--no-warm-up", help="Load every weight before serving")
    ] = True,
    precision: PrecisionOpt = None,
    quantize: QuantizeOpt = None,
    quantize_text_encoder: QuantizeTextOpt = "auto",
    adaln_cache: AdalnOpt = True,
    lora: LoraOpt = None,
    lightning: LightningOpt = None,
    parallel: ParallelOpt = "auto",
) -> None:
    """Serve a model (text-to-image or Edit) over the OpenAI Images and AUTOMATIC1111 APIs,
    with a web page at /; SIGTERM or Ctrl-C cancels every job and exits 0. Under mlx.launch
    rank 0 serves and the other processes follow its jobs (docs/distributed.md)."""
    with user_errors():
        try:
            from qwen_mlx.server.command import ServeError, check_options
            from qwen_mlx.server.command import serve as run_server
        except ImportError as e:
            raise UserError(
                f"the server needs its extra ({e.name} is missing): pip install 'qwen-mlx[server]'"
            ) from None
        try:
            check_options(host, port, api_key, max_queue)
        except ServeError as e:
            raise UserError(str(e)) from None
        if lightning is not None and lightning not in (4, 8):
            raise UserError(f"--lightning must be 4 or 8 (the LoRA's steps), got {lightning}")
        if quantize is not None:
            from qwen_mlx.quantize import check_bits

            check_bits(quantize)
        from qwen_mlx.distributed import check_parallel

        check_parallel(parallel)
        loras = [parse_lora(spec) for spec in lora or []]  # each file checked
        code = run_server(
            model,
            host=host,
            port=port,
            api_key=api_key,
            max_queue=max_queue,
            max_steps=max_steps,
            max_body_mb=max_body_mb,
            warm_up=warm_up,
            precision=precision,
            quantize=quantize,
            quantize_text_encoder=quantize_text_encoder,
            adaln_cache=adaln_cache,
            loras=loras,
            lightning=lightning,
            parallel=parallel,
        )
    raise typer.Exit(code)
