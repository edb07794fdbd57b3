"""Run `qwen-mlx serve` as a real process on a free loopback port, for the server tests."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

START_TIMEOUT = 120.0  # seconds: imports, loading and warming up the tiny model on 2 busy cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(model: Path, port: int, *args: str) -> list[str]:
    """`qwen-mlx serve` (the console script of this environment)."""
    cli = Path(sys.executable).parent / "qwen-mlx"
    return [str(cli), "serve", "--model", str(model), "--port", str(port), *args]


class Server:
    """A server process; ``url`` once /health answers 200. Stop with :meth:`stop` (SIGTERM)."""

    def __init__(self, model: Path, *args: str, cwd: Path, env: dict | None = None, key=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = key
        self.log = cwd / f"server-{self.port}.log"
        self._log = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            serve_command(model, self.port, *args),
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_healthy(self.url, [self.proc], START_TIMEOUT)
        except RuntimeError as e:
            self.stop()
            raise RuntimeError(f"{e}: {self.output()}") from None

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=60, **kw)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def output(self) -> str:
        self._log.flush()
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


def wait_healthy(url: str, procs: list[subprocess.Popen], timeout: float) -> None:
    """Until ``url``/health answers 200; RuntimeError if one of ``procs`` exits first or
    ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"the server exited {p.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server did not start in {timeout} s")


def png_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def png_metadata(data: bytes) -> dict:
    with Image.open(io.BytesIO(data)) as im:
        return json.loads(im.text["qwen_mlx"])


def png_text(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as im:
        return im.text["parameters"]


def png_file(size=(32, 32), color=(200, 40, 40), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` pixels in a few bytes (a decompression bomb's
    header): only a check before decoding can refuse it cheaply."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


class InProcessServer:
    """The app on uvicorn in a thread of this process, on a free loopback port (for tests that
    patch the pipeline, e.g. the Edit models' sizing areas)."""

    def __init__(self, app, worker):
        import threading

        import uvicorn

        self.worker = worker
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.05)

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kw)

    def stop(self) -> None:
        self.worker.close()
        self.server.should_exit = True
        self.thread.join(30)
