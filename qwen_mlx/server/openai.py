"""OpenAI's Images API: generations, edits, models (errors as ``{"error": {...}}``)."""

from __future__ import annotations

import time
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Request, Response, UploadFile
from pydantic import BaseModel, ConfigDict, Field

from .common import (
    ApiError,
    OpenAIError,
    as_mask,
    b64,
    error_responses,
    parse_size,
    read_image,
    read_uploads,
    run_job,
    server_timing,
    worker_of,
)
from .engine import Params
from .jobs import Job

router = APIRouter(prefix="/v1", tags=["OpenAI Images"], responses=error_responses(OpenAIError))
MAX_N = 10  # as OpenAI's


class GenerationBody(BaseModel):
    """OpenAI's fields, plus qwen-mlx's extensions (negative_prompt, seed, steps, cfg)."""

    model_config = ConfigDict(extra="ignore")
    prompt: str
    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    size: str | None = Field(None, description="WIDTHxHEIGHT or auto (the model's default)")
    response_format: Literal["b64_json", "url"] | None = None
    negative_prompt: str | None = None
    seed: int | None = Field(None, description="Image i uses seed + i; absent: random")
    steps: int | None = Field(None, description="Absent: the model's default (50)")
    cfg: float | None = Field(None, description="True CFG scale; absent: the model's (4)")


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]


def check_model(request: Request, model: str | None) -> None:
    served = worker_of(request).engine.model
    if model not in (None, "", served):
        raise ApiError(400, f"unknown model {model!r}; this server serves {served!r}")


def images_response(request: Request, job: Job, response_format: str | None) -> dict:
    base = str(request.base_url).rstrip("/")
    data = []
    for i, r in enumerate(job.results):
        if response_format == "url":
            data.append({"url": f"{base}/api/jobs/{job.id}/images/{i}.png"})
        else:
            data.append({"b64_json": b64(r.png)})
    return {"created": int(job.created), "data": data}


@router.post("/images/generations", response_model=ImagesResponse, response_model_exclude_none=True)
async def generations(body: GenerationBody, request: Request, response: Response):
    """Text to image."""
    check_model(request, body.model)
    width, height = parse_size(body.size)
    params = Params(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        width=width,
        height=height,
        steps=body.steps,
        cfg=body.cfg,
        seed=body.seed,
        n=body.n,
    )
    job = await run_job(request, params)
    server_timing(response, job)
    return images_response(request, job, body.response_format)


@router.post("/images/edits", response_model=ImagesResponse, response_model_exclude_none=True)
async def edits(
    request: Request,
    response: Response,
    prompt: Annotated[str, Form()],
    image: Annotated[list[UploadFile] | None, File(description="Image(s) to edit")] = None,
    images: Annotated[list[UploadFile] | None, File(alias="image[]")] = None,
    mask: Annotated[UploadFile | None, File(description="Transparent = repaint")] = None,
    model: Annotated[str | None, Form()] = None,
    n: Annotated[int, Form(ge=1, le=MAX_N)] = 1,
    size: Annotated[str | None, Form()] = None,
    response_format: Annotated[Literal["b64_json", "url"] | None, Form()] = None,
    negative_prompt: Annotated[str | None, Form()] = None,
    seed: Annotated[int | None, Form()] = None,
    steps: Annotated[int | None, Form()] = None,
    cfg: Annotated[float | None, Form()] = None,
    strength: Annotated[float | None, Form(description="img2img: 0-1, absent: 0.6")] = None,
):
    """Edit images: Qwen-Image-Edit on an Edit checkpoint (1-3 images as the model takes),
    img2img (or inpaint, with a mask) on a text-to-image one."""
    check_model(request, model)
    limit = worker_of(request).engine.max_image_pixels
    files = [*(image or []), *(images or [])]
    if not files:
        raise ApiError(400, "give an image to edit (field 'image' or 'image[]')")
    pictures, names = await read_uploads(files, limit)
    mask_image = as_mask(read_image(await mask.read(), "mask", limit)) if mask else None
    width, height = parse_size(size)
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
        mask=mask_image,
        strength=strength,
    )
    job = await run_job(request, params)
    server_timing(response, job)
    return images_response(request, job, response_format)


@router.get("/models")
async def models(request: Request):
    engine = worker_of(request).engine
    created = int(getattr(request.app.state, "started", time.time()))
    return {
        "object": "list",
        "data": [
            {"id": engine.model, "object": "model", "created": created, "owned_by": "qwen-mlx"}
        ],
    }
