"""PNGs that carry their generation parameters.

Two text chunks: ``parameters`` (AUTOMATIC1111's format, read by most image tools) and
``qwen_mlx`` (the full metadata as JSON). Files are written with ``outputs.save_exclusive``:
never clobbering a file unless ``overwrite``, never half-written.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from pathlib import Path


def parameters_text(params: dict) -> str:
    """The A1111-style ``parameters`` text of a metadata dict."""
    extra = ""
    if params.get("lightning"):
        extra += f"Lightning: {params['lightning']} steps, "
    if params.get("loras"):
        loras = " ".join(f"{x['name']}:{x['scale']:g}" for x in params["loras"])
        extra += f"LoRAs: {loras}, "
    if params.get("control"):
        c = params["control"]
        extra += (
            f"ControlNet: {c.get('controlnet')}, Control image: {', '.join(c['images'])}, "
            f"Control scale: {c['scale']}, Control window: {c['start']}-{c['end']}, "
        )
    if params.get("strength") is not None:
        extra += f"Denoising strength: {params['strength']}, "
        extra += "Mode: inpaint, " if params.get("mask") else "Mode: img2img, "
    text = (
        f"{params['prompt']}\nNegative prompt: {params.get('negative_prompt') or ''}\n"
        f"Steps: {params['steps']}, Sampler: FlowMatchEuler, CFG scale: {params['cfg']}, "
        f"Seed: {params['seed']}, Size: {params['width']}x{params['height']}, {extra}"
        f"Model: {params['model']}, Precision: {params['precision']}, "
        f"Version: qwen-mlx {params['version']}"
    )
    if params.get("images") and params.get("flavour"):
        text += ", Edit images: " + "; ".join(
            f"{im['file']} ({im.get('width')}x{im.get('height')})" for im in params["images"]
        )
    return text


def png_info(params: dict):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters_text(params))
    info.add_text("qwen_mlx", json.dumps(params, ensure_ascii=False, allow_nan=False))
    return info


def png_bytes(image, params: dict) -> bytes:
    """The PNG file of ``image`` with ``params``, in memory (the server's responses)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=png_info(params))
    return buf.getvalue()


def save_png(
    image, path: Path, params: dict, overwrite: bool = False, inputs: Iterable = ()
) -> tuple[Path, str | None]:
    """Write ``image`` with ``params``, never clobbering a file unless ``overwrite``: returns
    (where it was written, why not ``path`` or None); see ``qwen_mlx.outputs``. ``inputs``:
    ``(label, path)`` pairs of the run's input files, never replaced, whatever ``overwrite``
    says (``outputs.check_not_inputs``)."""
    from qwen_mlx.outputs import check_not_inputs, save_exclusive

    check_not_inputs([path], inputs)
    info = png_info(params)
    return save_exclusive(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info), overwrite)


def read_metadata(path: str | Path) -> dict:
    """The ``qwen_mlx`` JSON chunk of a PNG written by qwen-mlx."""
    from PIL import Image

    with Image.open(path) as im:
        return json.loads(im.text["qwen_mlx"])
