"""Image-to-image and inpainting, with diffusers' QwenImageImg2Img / Inpaint semantics.

* the input image is resized to the output size (PIL Lanczos, no crop), scaled to [-1, 1] and
  encoded to the VAE posterior **mean** (diffusers' ``sample_mode="argmax"``: deterministic);
* the schedule of ``num_inference_steps`` N is computed as for text-to-image and only its last
  ``ceil(N * strength)`` steps run (``strength`` 1 = all steps: the image only sets the size);
* the starting latents mix the noise in at the first kept sigma: ``s * noise + (1 - s) * image``;
* inpainting (a mask, white = repaint) blends after every step: outside the mask the latents are
  the image re-noised to the next sigma with the same noise (the clean image after the last).
  The mask is resized like the image, binarised at 0.5 and sampled at latent resolution (nearest).
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import numpy as np

from qwen_mlx.errors import RequestError


def as_pil(image, what: str = "image"):
    """An 8-bit PIL image from a PIL image, a path, or an (H, W[, C]) uint8 / uint16 / [0, 1]
    float array; 16-bit, 32-bit and float images are scaled by their range
    (``qwen_mlx.image_processing.read_image``)."""
    from qwen_mlx.image_processing import read_image

    return read_image(image, what)


def default_size(image, multiple: int) -> tuple[int, int]:
    """(width, height) of ``image`` rounded down to multiples of ``multiple`` (as diffusers)."""
    from qwen_mlx.checks import check_image_size

    w, h = image.size
    check_image_size(w, h, multiple)
    return w - w % multiple, h - h % multiple


def _resized(image, width: int, height: int):
    from PIL import Image

    return image.resize((width, height), resample=Image.Resampling.LANCZOS)


def image_array(image, width: int, height: int) -> mx.array:
    """(1, height, width, 3) float32 in [-1, 1]."""
    arr = np.asarray(_resized(image, width, height).convert("RGB")).astype(np.float32) / 255.0
    return mx.array(2.0 * arr - 1.0)[None]


def mask_array(mask, width: int, height: int, scale: int) -> mx.array:
    """(1, height/scale, width/scale, 1) 0/1 mask (1 = repaint) at latent resolution."""
    arr = np.asarray(_resized(mask, width, height).convert("L")).astype(np.float32) / 255.0
    binary = (arr >= 0.5).astype(np.float32)[::scale, ::scale]  # nearest: each block's corner
    if not binary.any():
        raise RequestError("the mask has no white (repaint) area at latent resolution")
    return mx.array(binary)[None, :, :, None]


def first_step(num_steps: int, strength: float) -> int:
    """Index of the first step kept of ``num_steps``: the last ``ceil(N * strength)`` steps run
    (diffusers' get_timesteps)."""
    if not 0.0 <= strength <= 1.0:
        raise RequestError(f"strength must be in [0, 1], got {strength}")
    start = int(max(num_steps - min(num_steps * strength, num_steps), 0))
    if start >= num_steps:
        raise RequestError(
            f"strength {strength} keeps no step of {num_steps} (it keeps ceil(steps * strength))"
        )
    return start


def trim_schedule(
    sigmas: np.ndarray, timesteps: np.ndarray, strength: float
) -> tuple[np.ndarray, np.ndarray]:
    """The schedule from the first step ``strength`` keeps (sigmas keep their trailing 0)."""
    start = first_step(len(timesteps), strength)
    return sigmas[start:], timesteps[start:]


def scale_noise(image_latents: mx.array, noise: mx.array, sigma: float) -> mx.array:
    """The flow-matching forward process at ``sigma``: ``sigma * noise + (1 - sigma) * x``."""
    s = float(np.float32(sigma))
    return s * noise + (1.0 - s) * image_latents


def inpaint_hook(
    image_latents: mx.array, noise: mx.array, mask: mx.array, sigmas: np.ndarray
) -> Callable[[int, mx.array], mx.array]:
    """The per-step blend: keep the image (re-noised to the next sigma) where ``mask`` is 0."""
    last = len(sigmas) - 2  # sigmas carry a trailing 0

    def hook(i: int, latents: mx.array) -> mx.array:
        known = image_latents if i >= last else scale_noise(image_latents, noise, sigmas[i + 1])
        return (1 - mask) * known + mask * latents

    return hook
