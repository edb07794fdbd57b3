"""``qwen-mlx serve``: load a model once and serve it until SIGTERM / Ctrl-C."""

from __future__ import annotations

import ipaddress
import signal
import sys
import threading

from qwen_mlx.errors import QwenMLXError


class ServeError(QwenMLXError, ValueError):
    """A bad option, or a model that does not load: one line, exit code 2."""


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
    port: int = 7860,
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

    from qwen_mlx.distributed import World, launched

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    check_options(host, port, api_key, max_queue)
    # under mlx.launch: rank 0 serves, the others follow its jobs (one group, joined here)
    world = World.init() if launched() else World(None)
    if not world.distributed:
        load.pop("parallel", None)
    limits = dict(max_steps=max_steps, max_images=max_images, max_image_pixels=max_image_pixels)

    def load_engine() -> Engine:
        with world.agree("loading the model"):
            return Engine.load(model, **limits, **load)

    if not world.is_main:
        # Ctrl-C in mlx.launch's terminal reaches every rank: rank 0 stops the group in step
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        load_engine().follow()  # rank 0's jobs (its warm-up first) until it stops
        return 0

    def factory() -> Engine:
        engine = load_engine()
        if warm_up:
            engine.warm_up()
        return engine

    running: list = []  # the HTTP server, once it exists

    def on_fatal(reason: str) -> None:  # on the worker thread: end the HTTP server
        for server in running:
            server.should_exit = True

    worker = Worker(factory, max_queue, on_fatal).start()
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
    server = _server_class()(config, worker)
    running.append(server)
    server.should_exit = worker.fatal is not None
    info = worker.engine.describe()
    group = ""
    if world.distributed:
        group = f", {info['processes']} processes, --parallel {info['parallel']}"
    log(
        f"serving {model} ({info['kind']}{group}) on http://{host}:{port}  (web page /, OpenAI "
        f"/v1, AUTOMATIC1111 /sdapi/v1; queue {max_queue}{', API key required' if api_key else ''})"
    )
    try:
        server.run()
    finally:
        worker.close()
    if worker.fatal is not None:
        raise ServeError(f"stopped: {worker.fatal}")
    log("stopped")
    return 0


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server; a signal also cancels every job at once (instead of waiting
        for them), and SIGTERM / Ctrl-C end with exit code 0 (uvicorn re-raises the signal
        otherwise)."""

        def __init__(self, config, worker):
            super().__init__(config)
            self.worker = worker

        def handle_exit(self, sig, frame) -> None:
            self.worker.stop_accepting()
            threading.Thread(target=self.worker.close, daemon=True).start()
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", [])
            if sig in (signal.SIGTERM, signal.SIGINT) and sig in captured:
                captured.remove(sig)  # a requested stop: exit 0, not killed by the signal

    return Server
