"""The FastAPI app: the OpenAI and A1111 surfaces, the web page's job API, auth and limits."""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import re
import time
from importlib import resources
from typing import Annotated

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwen_mlx.messages import one_line

from . import a1111, openai
from .common import (
    ApiError,
    PlainError,
    error_response,
    error_responses,
    read_uploads,
    submit,
    worker_of,
)
from .engine import Params
from .jobs import Worker

ERRORS = error_responses(PlainError)  # the web page API's errors


class Unavailable(BaseModel):
    """/health while loading or stopping."""

    status: str
    detail: str


DEFAULT_MAX_BODY = 64 * 2**20  # bytes: a few base64 images
# Reachable without the key: the page itself, the health check, and a job's progress stream
# and images, whose URLs hold the job's random 128-bit id (a capability known to its owner).
PUBLIC = re.compile(r"^/(|health|favicon\.ico|api/jobs/[\w-]+/(events|images/\d+\.png))$")


class BodyTooLarge(StarletteHTTPException):
    pass


class BodyLimit:
    """ASGI middleware: refuse a body above ``limit`` bytes (413), by its Content-Length or as
    it streams in, before it is parsed."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"the request body is larger than the {self.limit / 2**20:.0f} MiB limit"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            response = error_response(scope["path"], 413, message)
            return await response(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(413, message)
            return msg

        await self.app(scope, limited, send)


class KeyCheck:
    """ASGI middleware: every path but ``PUBLIC`` needs the API key (401 in the API's shape)."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not PUBLIC.match(scope["path"]):
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not authorized(header, self.key):
                response = error_response(
                    scope["path"],
                    401,
                    "missing or wrong API key (send 'Authorization: Bearer KEY')",
                    {"WWW-Authenticate": 'Bearer, Basic realm="qwen-mlx"'},
                )
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def authorized(header: str | None, key: str) -> bool:
    """``Authorization: Bearer KEY`` (OpenAI clients) or HTTP basic auth with KEY as the
    password (A1111's ``--api-auth``), compared in constant time."""
    if not header:
        return False
    scheme, _, value = header.partition(" ")
    value = value.strip()
    if scheme.lower() == "basic":
        try:
            value = base64.b64decode(value, validate=True).decode("utf-8").partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.encode("utf-8"), key.encode("utf-8"))


def create_app(
    worker: Worker, api_key: str | None = None, max_body: int = DEFAULT_MAX_BODY
) -> FastAPI:
    from qwen_mlx import __version__

    app = FastAPI(
        title="qwen-mlx",
        version=__version__,
        description="Qwen-Image on MLX: OpenAI Images and AUTOMATIC1111 APIs, and a web page.",
    )
    app.state.worker = worker
    app.state.started = time.time()
    app.include_router(openai.router)
    app.include_router(a1111.router)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(request.url.path, e.status, e.message, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return error_response(request.url.path, e.status_code, one_line(Exception(e.detail)))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x not in ("body", "query"))
        message = f"{where}: {first.get('msg', 'invalid')}" if where else first.get("msg", "")
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        status = 400 if request.url.path.startswith("/v1/") else 422
        return error_response(request.url.path, status, one_line(Exception(message)) + more)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        message = f"unexpected {type(e).__name__}: {one_line(e)}"
        return error_response(request.url.path, 500, message)

    if api_key:
        app.add_middleware(KeyCheck, key=api_key)
    app.add_middleware(BodyLimit, limit=max_body)  # outermost: before anything reads the body

    @app.get("/health", tags=["server"], responses={503: {"model": Unavailable}})
    async def health(request: Request):
        w: Worker = request.app.state.worker
        if w.engine is None or not w.accepting:
            why = w.load_error or ("shutting down" if not w.accepting else "loading the model")
            return JSONResponse({"status": "unavailable", "detail": why}, 503)
        return {
            "status": "ok",
            "model": w.engine.model,
            "queue": w.job_count,
            "max_queue": w.max_queue,
            "memory": w.memory,
            "last_job": None if w.last is None else {"state": w.last.state, "error": w.last.error},
        }

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return resources.files("qwen_mlx.server").joinpath("static/index.html").read_text("utf-8")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(status_code=204)

    # -- the web page's job API: submit, follow (server-sent events), cancel, fetch images

    @app.get("/api/info", tags=["web page"], responses=ERRORS)
    async def info(request: Request):
        return dict(worker_of(request).engine.describe(), auth=bool(api_key))

    @app.post("/api/jobs", status_code=202, tags=["web page"], responses=ERRORS)
    async def create_job(
        request: Request,
        prompt: Annotated[str, Form()],
        negative_prompt: Annotated[str | None, Form()] = None,
        width: Annotated[int | None, Form()] = None,
        height: Annotated[int | None, Form()] = None,
        steps: Annotated[int | None, Form()] = None,
        cfg: Annotated[float | None, Form()] = None,
        seed: Annotated[int | None, Form()] = None,
        n: Annotated[int, Form()] = 1,
        strength: Annotated[float | None, Form()] = None,
        image: Annotated[list[UploadFile] | None, File()] = None,
    ):
        """Queue a job and answer at once with its id; follow it at ``/api/jobs/{id}/events``."""
        limit = worker_of(request).engine.max_image_pixels
        pictures, names = await read_uploads(image or [], limit)
        params = Params(
            prompt=prompt,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            steps=steps,
            cfg=cfg,
            seed=seed,
            n=n,
            images=pictures,
            image_names=names,
            strength=strength,
        )
        job = await submit(request, params)
        return job.snapshot()

    def job_of(request: Request, job_id: str):
        job = request.app.state.worker.get(job_id)
        if job is None:
            raise ApiError(404, f"no job {job_id} (finished jobs are kept for a while only)")
        return job

    @app.get("/api/jobs/{job_id}", tags=["web page"], responses=ERRORS)
    async def get_job(job_id: str, request: Request):
        return job_of(request, job_id).snapshot()

    @app.post("/api/jobs/{job_id}/cancel", tags=["web page"], responses=ERRORS)
    async def cancel_job(job_id: str, request: Request):
        job = job_of(request, job_id)
        if not job.done.is_set():
            request.app.state.worker.cancel(job, "cancelled")
        return job.snapshot()

    @app.get("/api/jobs/{job_id}/images/{index}.png", tags=["web page"], responses=ERRORS)
    async def job_image(job_id: str, index: int, request: Request):
        job = job_of(request, job_id)
        if job.state != "done" or not 0 <= index < len(job.results):
            raise ApiError(404, f"job {job_id} has no image {index}")
        name = f"qwen-image-{job.results[index].seed}.png"
        return Response(
            job.results[index].png,
            media_type="image/png",
            headers={"Content-Disposition": f'inline; filename="{name}"'},
        )

    @app.get("/api/jobs/{job_id}/events", tags=["web page"], responses=ERRORS)
    async def job_events(job_id: str, request: Request):
        """Server-sent events: ``progress`` after steps, then one ``done``, ``cancelled`` or
        ``error`` with the job's state (results: image URLs and their parameters)."""
        job = job_of(request, job_id)

        async def stream():
            loop = asyncio.get_running_loop()
            wake = asyncio.Event()
            remove = job.listen(lambda: loop.call_soon_threadsafe(wake.set))
            try:
                seen = -1
                while True:
                    wake.clear()
                    if job.version != seen:
                        seen = job.version
                        snap = job.snapshot()
                        final = job.done.is_set()
                        kind = snap["state"] if final else "progress"
                        yield f"event: {kind}\ndata: {json.dumps(snap)}\n\n"
                        if final:
                            return
                    try:
                        await asyncio.wait_for(wake.wait(), 15)
                    except asyncio.TimeoutError:
                        yield ": keep-alive\n\n"
            finally:
                remove()

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return app
