"""What the API surfaces share: errors in each API's shape, image inputs, running a job."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from http import HTTPStatus

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from qwen_mlx.errors import QwenMLXError
from qwen_mlx.messages import one_line

from .engine import Params
from .jobs import Job, QueueFull, ShuttingDown, Worker


class ApiError(Exception):
    """An answer other than 200: ``status`` and a one-line ``message``."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = " ".join(message.split())
        self.headers = headers or {}


OPENAI_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    409: ("invalid_request_error", "cancelled"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "queue_full"),
    500: ("server_error", None),
    503: ("server_error", "unavailable"),
}


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    """OpenAI's error shape (what its clients parse)."""

    error: OpenAIErrorDetail


class A1111Error(BaseModel):
    """AUTOMATIC1111's error shape."""

    error: str
    detail: str
    body: str
    errors: str


class PlainError(BaseModel):
    """The web page API's (FastAPI's) error shape."""

    detail: str


ERROR_STATUSES = (400, 401, 404, 409, 413, 422, 429, 500, 503)


def error_responses(model: type[BaseModel], statuses=ERROR_STATUSES) -> dict:
    """The OpenAPI ``responses`` of a route (or a router) whose errors ``error_body`` shapes:
    every status it may answer besides 2xx, with its body (so clients and schema checks know)."""
    return {s: {"model": model, "description": HTTPStatus(s).phrase} for s in statuses}


def error_body(path: str, status: int, message: str) -> dict:
    """The error JSON each API's clients expect: OpenAI's ``{"error": {...}}`` under /v1,
    AUTOMATIC1111's ``{"error", "detail", "body", "errors"}`` under /sdapi, else
    ``{"detail"}`` (FastAPI's)."""
    if path.startswith("/v1/"):
        kind, code = OPENAI_TYPES.get(status, ("invalid_request_error", None))
        if status >= 500:
            kind = "server_error"
        return {"error": {"message": message, "type": kind, "param": None, "code": code}}
    if path.startswith("/sdapi/"):
        try:
            name = HTTPStatus(status).phrase.replace(" ", "")
        except ValueError:
            name = "Error"
        return {"error": name, "detail": message, "body": "", "errors": message}
    return {"detail": message}


def error_response(path: str, status: int, message: str, headers: dict | None = None):
    return JSONResponse(error_body(path, status, message), status, headers=headers)


# -- image inputs


def read_image(data: bytes, what: str, max_pixels: int):
    """Decode an uploaded image, checking its pixel count from the header *before* decoding
    (a small file can hold a huge image)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ApiError(400, f"{what} is empty")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise ApiError(400, f"{what} is too large to decode") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise ApiError(400, f"{what} is not an image (PNG, JPEG or WebP)") from None
    w, h = im.size
    if w * h > max_pixels:
        raise ApiError(
            400,
            f"{what} is {w}x{h} ({w * h / 1e6:.1f} MP); the limit is {max_pixels / 1e6:.1f} MP",
        )
    try:
        im.load()
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad upload
        raise ApiError(400, f"cannot decode {what}: {one_line(e)}") from None
    return im


async def read_uploads(files, max_pixels: int) -> tuple[tuple, tuple[str, ...]]:
    """(images, names) of uploaded files (``UploadFile``s), each checked by ``read_image``."""
    pictures, names = [], []
    for i, f in enumerate(files):
        pictures.append(read_image(await f.read(), f"image {i + 1}", max_pixels))
        names.append(f.filename or f"image-{i + 1}.png")
    return tuple(pictures), tuple(names)


def decode_base64(text: str, what: str) -> bytes:
    """A1111 sends images as base64, sometimes as a data URL."""
    if not isinstance(text, str):
        raise ApiError(422, f"{what} must be a base64 string")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, f"{what} is not valid base64") from None


def as_mask(image):
    """A mask, white = repaint; an image with transparency (OpenAI's convention: transparent
    = edit) becomes white where it is transparent."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        alpha = image.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            return alpha.point(lambda a: 255 if a < 128 else 0)
    return image.convert("L") if image.mode != "L" else image


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """OpenAI's ``"WxH"`` (or "auto" / absent: the model's default)."""
    if size is None or size == "auto":
        return None, None
    w, sep, h = size.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit():
        raise ApiError(400, f"size must be 'WIDTHxHEIGHT' (e.g. 1024x1024) or 'auto', got {size!r}")
    return int(w), int(h)


# -- jobs


def worker_of(request: Request) -> Worker:
    worker: Worker = request.app.state.worker
    if worker.engine is None:
        raise ApiError(503, worker.load_error or "the model is still loading")
    return worker


async def submit(request: Request, params: Params) -> Job:
    """Check ``params`` (the CLI's checks and the memory guard) and queue the job."""
    worker = worker_of(request)
    try:
        plan = await run_in_threadpool(worker.engine.check, params)
    except ApiError:
        raise
    except (QwenMLXError, ValueError, MemoryError, OverflowError) as e:
        raise ApiError(400, one_line(e)) from None
    try:
        return worker.submit(plan)
    except QueueFull as e:
        raise ApiError(429, str(e), {"Retry-After": str(e.retry_after)}) from None
    except ShuttingDown as e:
        raise ApiError(503, str(e)) from None


async def run_job(request: Request, params: Params) -> Job:
    """Submit and wait for the job; a client that disconnects cancels it."""
    job = await submit(request, params)
    worker: Worker = request.app.state.worker
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()

    def on_change() -> None:
        if job.done.is_set():
            loop.call_soon_threadsafe(wake.set)

    remove = job.listen(on_change)
    try:
        while True:
            wake.clear()
            if job.done.is_set():
                break
            try:
                await asyncio.wait_for(wake.wait(), 0.25)
            except asyncio.TimeoutError:
                pass
            if not job.done.is_set() and await request.is_disconnected():
                worker.cancel(job, "the client disconnected")
                break
    finally:
        remove()
    if job.state != "done":
        raise ApiError(job.status if job.status != 200 else 500, job.error or job.state)
    return job


def server_timing(response, job: Job) -> None:
    """``Server-Timing``: the job's wait in the queue and its run (generate + PNG), in ms."""
    wait = (job.started - job.created) * 1000
    run = (job.finished - job.started) * 1000
    response.headers["Server-Timing"] = f"queue;dur={wait:.1f}, generate;dur={run:.1f}"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
