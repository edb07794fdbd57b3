"""AUTOMATIC1111's web API (``/sdapi/v1``): the part image clients use.

Absent fields take the model's defaults (50 steps, CFG 4, its size), not A1111's; sampler,
scheduler, hires-fix and the like are accepted and ignored (the model has one sampler).
"""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from qwen_mlx import __version__

from .common import (
    A1111Error,
    ApiError,
    as_mask,
    b64,
    decode_base64,
    error_responses,
    read_image,
    run_job,
    server_timing,
    worker_of,
)
from .engine import Params
from .jobs import Job

router = APIRouter(
    prefix="/sdapi/v1", tags=["AUTOMATIC1111"], responses=error_responses(A1111Error)
)
SAMPLER = "FlowMatchEuler"


class Txt2ImgBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: str = ""
    negative_prompt: str | None = None
    seed: int = Field(-1, description="-1: random; image i uses seed + i")
    steps: int | None = Field(None, description="Absent: the model's default (50)")
    cfg_scale: float | None = Field(None, description="Absent: the model's default (4)")
    width: int | None = None
    height: int | None = None
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    sampler_name: str | None = None


class Img2ImgBody(Txt2ImgBody):
    init_images: list[str] = Field(default_factory=list, description="Base64 images")
    denoising_strength: float | None = Field(None, description="Absent: 0.6")
    mask: str | None = Field(None, description="Base64 mask, white = repaint")
    inpainting_mask_invert: int = 0


class ImagesAnswer(BaseModel):
    images: list[str]
    parameters: dict[str, Any]
    info: str


def params_of(body: Txt2ImgBody, images=(), names=(), mask=None, strength=None) -> Params:
    if body.seed < -1:
        raise ApiError(422, f"seed must be -1 (random) or at least 0, got {body.seed}")
    return Params(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        width=body.width,
        height=body.height,
        steps=body.steps,
        cfg=body.cfg_scale,
        seed=None if body.seed == -1 else body.seed,
        n=body.batch_size * body.n_iter,
        images=tuple(images),
        image_names=tuple(names),
        mask=mask,
        strength=strength,
    )


def answer(body: Txt2ImgBody, job: Job) -> dict:
    plan = job.plan
    infotexts = [_infotext(r.png) for r in job.results]
    info = {
        "prompt": body.prompt,
        "all_prompts": [body.prompt] * job.n,
        "negative_prompt": plan.negative_prompt,
        "all_negative_prompts": [plan.negative_prompt] * job.n,
        "seed": plan.seeds[0],
        "all_seeds": plan.seeds,
        "subseed": -1,
        "all_subseeds": [-1] * job.n,
        "width": plan.width,
        "height": plan.height,
        "sampler_name": SAMPLER,
        "cfg_scale": plan.cfg,
        "steps": plan.steps,
        "batch_size": body.batch_size,
        "n_iter": body.n_iter,
        "sd_model_name": plan.model,
        "denoising_strength": plan.strength,
        "infotexts": infotexts,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
        "version": f"qwen-mlx {__version__}",
    }
    parameters = body.model_dump(exclude={"init_images", "mask"})
    return {
        "images": [b64(r.png) for r in job.results],
        "parameters": parameters,
        "info": json.dumps(info),
    }


def _infotext(png: bytes) -> str:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        return im.text.get("parameters", "")


@router.post("/txt2img", response_model=ImagesAnswer)
async def txt2img(body: Txt2ImgBody, request: Request, response: Response):
    job = await run_job(request, params_of(body))
    server_timing(response, job)
    return answer(body, job)


@router.post("/img2img", response_model=ImagesAnswer)
async def img2img(body: Img2ImgBody, request: Request, response: Response):
    """img2img / inpaint on a text-to-image checkpoint; Edit on an Edit one (the init images
    are its inputs)."""
    limit = worker_of(request).engine.max_image_pixels
    if not body.init_images:
        raise ApiError(422, "init_images must hold at least one base64 image")
    images, names = [], []
    for i, text in enumerate(body.init_images):
        data = decode_base64(text, f"init_images[{i}]")
        images.append(read_image(data, f"init image {i}", limit))
        names.append(f"init-{i}.png")
    mask = None
    if body.mask:
        mask = as_mask(read_image(decode_base64(body.mask, "mask"), "mask", limit))
        if body.inpainting_mask_invert:
            from PIL import ImageOps

            mask = ImageOps.invert(mask.convert("L"))
    job = await run_job(request, params_of(body, images, names, mask, body.denoising_strength))
    server_timing(response, job)
    return answer(body, job)


@router.get("/progress")
async def progress(request: Request, skip_current_image: bool = False):
    worker = request.app.state.worker
    job = worker.current
    last = worker.last
    state = {
        "skipped": False,
        "interrupted": bool(last is not None and last.token.reason == "interrupted")
        if job is None
        else job.token.cancelled,
        "stopping_generation": False,
        "job": job.id if job else "",
        "job_count": worker.job_count,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)) if job else "0",
        "job_no": job.image if job else 0,
        "sampling_step": job.step if job else 0,
        "sampling_steps": job.total if job else 0,
    }
    eta = job.eta if job else None  # seconds left (A1111's eta_relative); 0 until a step ran
    return {
        "progress": round(job.progress, 4) if job else 0.0,
        "eta_relative": round(eta, 2) if eta is not None else 0.0,
        "state": state,
        "current_image": None,
        "textinfo": None if job is None else f"image {job.image + 1}/{job.n}",
    }


@router.post("/interrupt")
async def interrupt(request: Request):
    """Stop the running job within one step (queued jobs still run)."""
    request.app.state.worker.interrupt()
    return {}


@router.post("/skip")
async def skip(request: Request):
    request.app.state.worker.interrupt()
    return {}


@router.get("/options")
async def get_options(request: Request):
    engine = worker_of(request).engine
    return {"sd_model_checkpoint": engine.model, "samples_format": "png"}


@router.post("/options")
async def set_options(body: dict[str, Any], request: Request):
    """Options are accepted and ignored, except a checkpoint other than the served one."""
    engine = worker_of(request).engine
    wanted = body.get("sd_model_checkpoint")
    if wanted not in (None, "", engine.model):
        raise ApiError(
            400, f"this server serves {engine.model!r} only; restart it with --model {wanted}"
        )
    return None


@router.get("/sd-models")
async def sd_models(request: Request):
    engine = worker_of(request).engine
    return [
        {
            "title": engine.model,
            "model_name": engine.model,
            "hash": None,
            "sha256": None,
            "filename": str(engine.pipe.source.root),
            "config": None,
        }
    ]


@router.get("/samplers")
async def samplers():
    return [{"name": SAMPLER, "aliases": ["euler"], "options": {}}]
