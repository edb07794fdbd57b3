"""ControlNet inputs with the semantics of diffusers' ``QwenImageControlNetPipeline`` and
``QwenImageControlNetInpaintPipeline``, and the Canny preprocessor.

* The control image is resized to the output size (PIL Lanczos, no crop; the size rounded down
  to a multiple of 16 as for every generation), scaled to [-1, 1], VAE-encoded, normalised with
  the VAE's latents mean/std and packed 2x2 like the noisy latents.
* Inpainting ControlNet (``extra_condition_channels`` > 0): the mask is made grayscale, resized
  like the image and binarised at 0.5 (white = repaint); the masked image is the control image
  with the repainted pixels set to -1 (black); the condition is [latents of the masked image,
  1 - mask sampled at latent resolution (nearest: each 8x8 block's corner)], packed 2x2.
* The VAE posterior **mean** is used where diffusers draws a sample (``latent_dist.sample``):
  deterministic, and free of a second random stream; the difference is the VAE's posterior
  standard deviation, which the parity tests remove from the reference the same way.
* The guidance window: step i of N runs the ControlNet when ``i / N >= start`` and
  ``(i + 1) / N <= end`` (diffusers' ``controlnet_keep``); outside it, no residuals (scale 0).
* The residuals are computed once per step with the positive prompt and added to both CFG
  branches, as diffusers does.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import numpy as np

from qwen_mlx.errors import QwenMLXError

# The Union ControlNet's recommended scales (InstantX model card); the default is diffusers' 1.0.
DEFAULT_SCALE = 1.0
CANNY_LOW, CANNY_HIGH = 100, 200
PREPROCESSORS = ("canny",)
MULTI_CONTROLNET_ERROR = (
    "several ControlNets at once are not supported (diffusers' QwenImageMultiControlNetModel only "
    "supports a single controlnet-union): load one ControlNet and pass several control images"
)


def check_window(start: float, end: float) -> None:
    """The guidance window must be a non-empty part of [0, 1]."""
    for name, value in (("control_guidance_start", start), ("control_guidance_end", end)):
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if start >= end:
        raise ValueError(
            f"control_guidance_start ({start}) must be below control_guidance_end ({end})"
        )


def check_scale(scale: float) -> None:
    if not np.isfinite(scale):
        raise ValueError(f"controlnet_conditioning_scale must be a finite number, got {scale}")


def keep(num_steps: int, start: float, end: float) -> list[float]:
    """1.0 for the steps whose ControlNet runs, 0.0 for the others (diffusers' rule)."""
    return [
        1.0 - float(i / num_steps < start or (i + 1) / num_steps > end) for i in range(num_steps)
    ]


def pixels(image, width: int, height: int) -> mx.array:
    """(1, height, width, 3) float32 in [-1, 1]: diffusers' ``VaeImageProcessor.preprocess``."""
    from PIL import Image

    resized = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    arr = np.asarray(resized.convert("RGB")).astype(np.float32) / 255.0
    return mx.array(2.0 * arr - 1.0)[None]


def mask_pixels(mask, width: int, height: int) -> np.ndarray:
    """(height, width) 0/1 float32, 1 = repaint: the mask processor (grayscale, resize,
    binarise at 0.5, no normalisation)."""
    from PIL import Image

    gray = mask.convert("L").resize((width, height), resample=Image.Resampling.LANCZOS)
    arr = np.asarray(gray).astype(np.float32) / 255.0
    return (arr >= 0.5).astype(np.float32)


Encoder = Callable[[mx.array], mx.array]  # (1, H, W, 3) in [-1, 1] -> normalised (1, h, w, z)


def pack(z: mx.array) -> mx.array:
    """(B, h, w, C) -> (B, h/2 * w/2, C*4), channel index c*4 + dy*2 + dx (diffusers' packing)."""
    B, h, w, C = z.shape
    z = z.reshape(B, h // 2, 2, w // 2, 2, C).transpose(0, 1, 3, 5, 2, 4)
    return z.reshape(B, (h // 2) * (w // 2), C * 4)


def union_condition(encode: Encoder, image, width: int, height: int) -> mx.array:
    """Packed (1, L, 4 * z_dim) control latents of ``image`` at width x height."""
    return pack(encode(pixels(image, width, height)).astype(mx.float32))


def inpaint_condition(
    encode: Encoder, image, mask, width: int, height: int, scale: int
) -> mx.array:
    """Packed (1, L, 4 * (z_dim + 1)) condition of the Inpainting ControlNet: the masked
    image's latents and the kept area (1 - mask) at latent resolution."""
    m = mask_pixels(mask, width, height)
    if not m.any():
        raise ValueError("the control mask has no white (repaint) area")
    x = pixels(image, width, height)
    masked = mx.where(mx.array(m > 0.5)[None, :, :, None], -1.0, x)
    z = encode(masked).astype(mx.float32)
    keep_area = 1.0 - m[::scale, ::scale]  # nearest-neighbour down-sampling
    keep_area = mx.array(keep_area)[None, :, :, None]
    if keep_area.shape[1:3] != z.shape[1:3]:
        raise ValueError(f"mask at latent size {keep_area.shape[1:3]} != latents {z.shape[1:3]}")
    return pack(mx.concatenate([z, keep_area], axis=-1))


# ----------------------------------------------------------------------------- preprocessors


def canny(image, low: int = CANNY_LOW, high: int = CANNY_HIGH):
    """Canny edges (white on black, RGB) with OpenCV's ``cv2.Canny`` on the grayscale image."""
    from PIL import Image

    cv2 = _opencv()
    if not (0 <= low <= high):
        raise ValueError(f"canny thresholds must satisfy 0 <= low <= high, got {low}, {high}")
    gray = np.asarray(image.convert("L"))
    edges = cv2.Canny(gray, int(low), int(high))
    return Image.fromarray(edges).convert("RGB")


def preprocess(name: str, image, **kw):
    if name not in PREPROCESSORS:
        raise ValueError(
            f"unknown control preprocessor {name!r}; choose {', '.join(PREPROCESSORS)} (depth "
            "and pose need models of their own: pass an already preprocessed image)"
        )
    return canny(image, **kw)


def _opencv():
    try:
        import cv2
    except ImportError:
        raise QwenMLXError(
            "the Canny preprocessor needs OpenCV: pip install 'qwen-mlx[control]' "
            "(opencv-python-headless)"
        ) from None
    return cv2
