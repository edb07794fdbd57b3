"""``qwen-mlx serve``: load a model once and serve it until SIGTERM / Ctrl-C."""

from __future__ import annotations

import ipaddress
import logging
import signal
import sys
import threading
from typing import Annotated

import typer

DEFAULT_PORT = 7860  # A1111's (and Draw Things')


class ServeError(ValueError):
    """A bad option: one line, exit code 2."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_options(host: str, port: int, api_key: str | None, max_queue: int) -> None:
    """Refuse what would be unsafe or cannot work, before anything loads."""
    if not is_loopback(host) and not api_key:
        raise ServeError(
            f"refusing to listen on {host} without --api-key: anyone who can reach it could use "
            "this machine (bind 127.0.0.1, or set --api-key / $QWEN_MLX_API_KEY)"
        )
    if not 0 < port < 65536:
        raise ServeError(f"--port must be in 1-65535, got {port}")
    if max_queue < 1:
        raise ServeError(f"--max-queue must be at least 1, got {max_queue}")
    if api_key is not None and len(api_key) < 8:
        raise ServeError("--api-key must be at least 8 characters")


def serve(
    model: str,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    api_key: str | None = None,
    max_queue: int = 8,
    max_body_mb: float = 64,
    max_steps: int | None = None,
    max_images: int = 10,
    max_image_pixels: int = 50_000_000,
    warm_up: bool = True,
    log=None,
    **load,
) -> int:
    """Load ``model`` (``load``: generate's load options, see ``Engine.load``), then serve.
    Returns the exit code: 0 after SIGTERM / Ctrl-C (every job cancelled, nothing written)."""
    try:
        import uvicorn

        from .app import create_app
        from .engine import Engine
        from .jobs import Worker
    except ImportError as e:
        raise ServeError(
            f"the server needs its extra ({e.name} is missing): pip install 'qwen-mlx[server]'"
        ) from None

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    check_options(host, port, api_key, max_queue)

    def factory() -> Engine:
        engine = Engine.load(
            model,
            max_steps=max_steps,
            max_images=max_images,
            max_image_pixels=max_image_pixels,
            **load,
        )
        if warm_up:
            engine.warm_up()
        return engine

    worker = Worker(factory, max_queue).start()
    log(f"loading {model} ...")
    worker.ready.wait()
    if worker.engine is None:
        raise ServeError(worker.load_error or "the model did not load")
    app = create_app(worker, api_key, int(max_body_mb * 2**20))
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=10,
        access_log=False,
    )
    server = _Server(config, worker)
    kind = worker.engine.describe()["kind"]
    log(
        f"serving {model} ({kind}) on http://{host}:{port}  (web page /, OpenAI /v1, "
        f"AUTOMATIC1111 /sdapi/v1; queue {max_queue}{', API key required' if api_key else ''})"
    )
    try:
        server.run()
    finally:
        worker.close()
    if server.failed:
        raise ServeError(f"could not listen on {host}:{port} (is the port taken?)")
    log("stopped")
    return 0


try:
    import uvicorn as _uvicorn

    class _Server(_uvicorn.Server):
        """uvicorn's server; a signal also cancels every job at once (instead of waiting
        for them), and SIGTERM / Ctrl-C end with exit code 0 (uvicorn re-raises the signal
        otherwise)."""

        def __init__(self, config, worker):
            super().__init__(config)
            self.worker = worker
            self.failed = False

        def handle_exit(self, sig, frame) -> None:
            self.worker.stop_accepting()
            threading.Thread(target=self.worker.close, daemon=True).start()
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", [])
            if sig in (signal.SIGTERM, signal.SIGINT) and sig in captured:
                captured.remove(sig)  # a requested stop: exit 0, not killed by the signal

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            self.failed = not self.started

except ImportError:  # pragma: no cover - the server extra is not installed
    _Server = None


def serve_cli(
    model: Annotated[
        str, typer.Option(help="Converted or diffusers folder, or hub repo id (Edit too)")
    ] = "Qwen/Qwen-Image",
    host: Annotated[
        str, typer.Option(help="Address to listen on; beyond loopback needs --api-key")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (A1111's)")] = DEFAULT_PORT,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="QWEN_MLX_API_KEY", help="Require this key (Bearer or basic auth)"),
    ] = None,
    max_queue: Annotated[int, typer.Option(help="Jobs waiting behind the running one")] = 8,
    max_steps: Annotated[int | None, typer.Option(help="Most steps a request may ask")] = None,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body, MiB")] = 64,
    warm_up: Annotated[
        bool, typer.Option("--warm-up/--no-warm-up", help="Load every weight before serving")
    ] = True,
    precision: Annotated[
        str | None,
        typer.Option(help="Override the stored plan: fp32, bf16, fp16, mixed, auto (this Mac)"),
    ] = None,
    quantize: Annotated[
        int | None, typer.Option(help="Quantize a float transformer as it loads: 4 or 8 bits")
    ] = None,
    quantize_text_encoder: Annotated[
        str, typer.Option(help="Language model: 4, 8, none, or auto (8 with --quantize)")
    ] = "auto",
    adaln_cache: Annotated[
        bool,
        typer.Option("--adaln-cache/--no-adaln-cache", help="Precompute the modulation"),
    ] = True,
    lora: Annotated[
        list[str] | None,
        typer.Option(help="LoRA file PATH[:SCALE] (scale 1 by default); repeat to stack"),
    ] = None,
    lightning: Annotated[
        int | None,
        typer.Option(help="Lightning preset (4 or 8 steps, CFG 1) for a Lightning --lora"),
    ] = None,
) -> None:
    """Serve a model over the OpenAI Images and AUTOMATIC1111 APIs, with a web page at /."""
    from qwen_mlx.cli import UserError, parse_lora, user_errors

    with user_errors():
        try:
            check_options(host, port, api_key, max_queue)
        except ServeError as e:
            raise UserError(str(e)) from None
        if lightning is not None and lightning not in (4, 8):
            raise UserError(f"--lightning must be 4 or 8, got {lightning}")
        if quantize is not None:
            from qwen_mlx.quantize import check_bits

            check_bits(quantize)
        loras = [parse_lora(spec) for spec in lora or []]
        for path, _ in loras:
            if not path.is_file():
                raise UserError(f"LoRA file not found: {path}")
        code = serve(
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
        )
    raise typer.Exit(code)


def main() -> None:  # pragma: no cover - `python -m qwen_mlx.server`
    logging.basicConfig(level=logging.WARNING)
    typer.run(serve_cli)
