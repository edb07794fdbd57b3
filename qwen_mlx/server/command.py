"""``qwen-mlx serve``: load a model once and serve it until SIGTERM / Ctrl-C."""

from __future__ import annotations

import ipaddress
import logging
import signal
import sys
import threading

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
        """uvicorn's server; a signal also cancels every job at once (instead of waiting for
        them), and SIGTERM ends with exit code 0 (uvicorn re-raises the signal otherwise)."""

        def __init__(self, config, worker):
            super().__init__(config)
            self.worker = worker
            self.failed = False

        def handle_exit(self, sig, frame) -> None:
            self.worker.stop_accepting()
            threading.Thread(target=self.worker.close, daemon=True).start()
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM and sig in getattr(self, "_captured_signals", []):
                self._captured_signals.remove(sig)

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            self.failed = not self.started

except ImportError:  # pragma: no cover - the server extra is not installed
    _Server = None


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - `python -m qwen_mlx.server`
    import argparse

    parser = argparse.ArgumentParser(prog="python -m qwen_mlx.server", description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--max-queue", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--max-body-mb", type=float, default=64)
    parser.add_argument("--precision", default=None)
    parser.add_argument("--no-warm-up", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        return serve(
            args.model,
            host=args.host,
            port=args.port,
            api_key=args.api_key,
            max_queue=args.max_queue,
            max_steps=args.max_steps,
            max_body_mb=args.max_body_mb,
            warm_up=not args.no_warm_up,
            precision=args.precision,
        )
    except (ValueError, OSError, MemoryError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
