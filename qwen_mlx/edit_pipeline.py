"""QwenImageEditPipeline: image(s) + instruction -> image, with diffusers' Edit semantics.

One class for the three releases; the checkpoint says which it is:

- ``model_index.json`` ``_class_name`` ``QwenImageEditPipeline`` = Qwen-Image-Edit: one image,
  resized to about 1024x1024 pixels of area (sides multiples of 32) for both the vision tower
  and the VAE; 50 steps by default;
- ``QwenImageEditPlusPipeline`` = Edit-2509 / Edit-2511: one or more images, each sized on its
  own: about 384x384 for the vision tower ("Picture i: " prompts) and 1024x1024 for the VAE;
  40 steps by default;
- a transformer config with ``zero_cond_t: true`` = Edit-2511: reference-image tokens are
  modulated at t = 0 (the transformer handles it).

It reuses the text-to-image pipeline's stages: ``prepare_latents`` (the target's noise),
``schedule`` (``mu`` from the noisy tokens only), ``denoise`` (the reference latents -- VAE
posterior means, normalised and packed -- appended after the noisy tokens at frames 1..n, the
prediction sliced back) and ``decode``. What Edit adds is ``encode_prompt`` with images and
``encode_references``.

Input images are converted to RGB first (transparency composited onto white); diffusers expects
RGB images and fails on others.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image

from qwen_mlx.errors import CheckpointError
from qwen_mlx.image_processing import to_rgb
from qwen_mlx.pipeline import (
    PATCH,
    Embeds,
    QwenImagePipeline,
    check_size,
    pack_latents,
    pad_embeddings,
)

EDIT_CLASSES = {"QwenImageEditPipeline": False, "QwenImageEditPlusPipeline": True}
VAE_IMAGE_AREA = 1024 * 1024
CONDITION_IMAGE_AREA = 384 * 384
DEFAULT_STEPS = {False: 50, True: 40}  # the official examples: Edit 50, 2509/2511 40

__all__ = ["QwenImageEditPipeline", "edit_dimensions"]


def edit_dimensions(area: int, width: int, height: int) -> tuple[int, int]:
    """(width, height) of about ``area`` pixels at the image's aspect ratio, sides rounded to
    multiples of 32 (diffusers' ``calculate_dimensions``)."""
    ratio = width / height
    w = math.sqrt(area * ratio)
    h = w / ratio
    w, h = round(w / 32) * 32, round(h / 32) * 32
    if w < 32 or h < 32:
        raise ValueError(
            f"an image of {width}x{height} is too elongated: at {area} pixels of area it would "
            f"be {w}x{h}"
        )
    return w, h


def _resize(image: Image.Image, width: int, height: int) -> Image.Image:
    """diffusers' VaeImageProcessor.resize for PIL images: Lanczos."""
    return image.resize((width, height), resample=Image.Resampling.LANCZOS)


def _as_images(image) -> list[Image.Image]:
    images = [image] if isinstance(image, Image.Image) else image
    if not isinstance(images, (list, tuple)) or not all(
        isinstance(im, Image.Image) for im in images
    ):
        raise ValueError("image must be a PIL image or a list of PIL images")
    if not images:
        raise ValueError("Edit needs an input image")
    return list(images)


def _image_key(images: Sequence[Image.Image]) -> str:
    digest = hashlib.sha1()
    for image in images:
        digest.update(f"{image.mode}{image.size}".encode())
        digest.update(image.tobytes())
    return digest.hexdigest()


class QwenImageEditPipeline(QwenImagePipeline):
    """Qwen-Image-Edit, Edit-2509 and Edit-2511. Build with :meth:`from_pretrained`."""

    # Target areas (pixels); tests shrink them to keep tiny models fast.
    vae_image_area: int = VAE_IMAGE_AREA
    condition_image_area: int = CONDITION_IMAGE_AREA

    def __init__(self, source, *args, **kwargs):
        cls_name = source.index.get("_class_name")
        if cls_name not in EDIT_CLASSES:
            raise CheckpointError(
                f"{source.name} is a {cls_name or 'checkpoint without _class_name'}, not a "
                f"Qwen-Image-Edit checkpoint ({' or '.join(EDIT_CLASSES)}); use QwenImagePipeline"
            )
        super().__init__(source, *args, **kwargs)
        self.plus = EDIT_CLASSES[cls_name]
        self._edit_prompts: dict[tuple[str, str], Embeds] = {}
        self._references: tuple[str, mx.array, list] | None = None  # the last images' latents

    @classmethod
    def from_pretrained(cls, src: str | Path, *args, **kwargs) -> QwenImageEditPipeline:
        """As ``QwenImagePipeline.from_pretrained``; the checkpoint must be an Edit one with a
        ``processor/`` folder."""
        pipe = super().from_pretrained(src, *args, **kwargs)
        pipe.source.folder("processor")
        return pipe

    @property
    def flavour(self) -> str:
        """ "edit", "edit-2509" or "edit-2511" (what the checkpoint is)."""
        if not self.plus:
            return "edit"
        return "edit-2511" if self.transformer_config().get("zero_cond_t") else "edit-2509"

    @property
    def default_steps(self) -> int:
        return DEFAULT_STEPS[self.plus]

    @property
    def text_encoder(self):
        if "text_encoder" not in self._components:
            from qwen_mlx.models.edit_prompt import QwenEditTextEncoder

            config, weights = self.source.component("text_encoder")
            self._components["text_encoder"] = QwenEditTextEncoder.from_weights(
                config,
                weights,
                self.source.folder("tokenizer"),
                self.source.folder("processor"),
                plus=self.plus,
                dtype=self._component_dtype("text_encoder"),
                where=str(self.source.folder("text_encoder")),
            )
        return self._components["text_encoder"]

    # -- images

    def prepare_images(
        self, image: Image.Image | Sequence[Image.Image]
    ) -> tuple[list[Image.Image], list[Image.Image]]:
        """(condition images for the vision tower, images for the VAE), sized as diffusers does."""
        images = _as_images(image)
        if not self.plus and len(images) != 1:
            raise ValueError(
                f"Qwen-Image-Edit takes one image, got {len(images)}; Edit-2509/2511 take several"
            )
        images = [to_rgb(im) for im in images]
        if not self.plus:
            w, h = edit_dimensions(self.vae_image_area, *images[0].size)
            resized = _resize(images[0], w, h)
            return [resized], [resized]
        conditions, vae_images = [], []
        for im in images:
            conditions.append(_resize(im, *edit_dimensions(self.condition_image_area, *im.size)))
            vae_images.append(_resize(im, *edit_dimensions(self.vae_image_area, *im.size)))
        return conditions, vae_images

    def edit_size(
        self, image: Image.Image | Sequence[Image.Image], height: int | None, width: int | None
    ) -> tuple[int, int]:
        """(height, width) of the result: as given, else about 1024x1024 pixels at the aspect
        of the first (Edit) or last (Edit-2509/2511) input image, as diffusers picks it."""
        images = _as_images(image)
        ref = images[-1] if self.plus else images[0]
        w, h = edit_dimensions(self.vae_image_area, *ref.size)
        multiple = self.vae_scale * PATCH
        height = height or h // multiple * multiple
        width = width or w // multiple * multiple
        check_size(height, width, multiple)
        return height, width

    def encode_references(self, vae_images: Sequence[Image.Image]) -> tuple[mx.array, list]:
        """Packed reference latents (1, sum of tokens, C) and their (1, h, w) token grids: the
        VAE posterior mean of each image, normalised with the latents' mean and std. The last
        images' latents are kept, so sampling them with many seeds encodes them once."""
        key = _image_key(vae_images)
        if self._references is not None and self._references[0] == key:
            return self._references[1], self._references[2]
        vae = self.vae
        mean = mx.array(vae.latents_mean, dtype=mx.float32)
        std = mx.array(vae.latents_std, dtype=mx.float32)
        parts, shapes = [], []
        for im in vae_images:
            x = mx.array(np.asarray(im, dtype=np.float32) / np.float32(255.0))[None] * 2.0 - 1.0
            z = (vae.encode(x).astype(mx.float32) - mean) / std
            parts.append(pack_latents(z))
            shapes.append((1, z.shape[1] // PATCH, z.shape[2] // PATCH))
        refs = mx.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        mx.eval(refs)
        self._references = (key, refs, shapes)
        return refs, shapes

    # -- stage 1: prompts with images

    def encode_prompt(
        self,
        prompts: str | Sequence[str],
        images: Sequence[Image.Image] | None = None,
        max_sequence_length: int = 512,
    ) -> Embeds:
        """Embeddings and mask of ``prompts``, each seeing the condition ``images`` (already
        sized by ``prepare_images``). Each distinct (prompt, images) pair is encoded once per
        pipeline; the ones not seen yet go through the text encoder in one batch with one
        vision-tower pass. Prompts are never truncated (as in diffusers' Edit pipelines)."""
        del max_sequence_length
        if images is None:
            raise ValueError("Edit prompts need the input image(s)")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be one or more strings")
        key = _image_key(images)
        new = list(dict.fromkeys(p for p in prompts if (p, key) not in self._edit_prompts))
        if new:
            embeds, mask = self.text_encoder.encode(new, list(images))
            lengths = [embeds.shape[1]] * len(new) if mask is None else mask.sum(axis=1).tolist()
            for i, p in enumerate(new):
                row = embeds[i : i + 1, : int(lengths[i])]
                mx.eval(row)
                self._edit_prompts[(p, key)] = (row, None)
        rows = [self._edit_prompts[(p, key)] for p in prompts]
        return pad_embeddings([e for e, _ in rows], [m for _, m in rows])

    # -- the driver

    def __call__(
        self,
        image: Image.Image | Sequence[Image.Image],
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = " ",
        num_inference_steps: int | None = None,
        true_cfg_scale: float = 4.0,
        seed: int | list[int] | None = None,
        latents: mx.array | np.ndarray | None = None,
        height: int | None = None,
        width: int | None = None,
        output_type: str = "pil",
        callback: Callable[[int, int, mx.array], None] | None = None,
        sigmas: list[float] | None = None,
        low_memory: bool = False,
    ):
        """Edit ``image`` (one PIL image, or a list for Edit-2509/2511) as ``prompt`` says.

        Returns PIL images, or with output_type="np" float32 (B, H, W, 3) in [0, 1]
        (output_type="latent": packed latents). ``num_inference_steps`` defaults to 50 (Edit) or
        40 (2509/2511). True CFG runs when ``true_cfg_scale > 1`` and ``negative_prompt`` is not
        None (default " ", as the official examples). ``latents``: packed (B, L, C) noise for
        the target; ``height``/``width`` default to about 1024x1024 at the input's aspect.
        """
        if output_type not in ("pil", "np", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")
        steps = self.default_steps if num_inference_steps is None else num_inference_steps
        if steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {steps}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a list of strings")
        conditions, vae_images = self.prepare_images(image)  # checks the images
        height, width = self.edit_size(image, height, width)
        do_cfg = true_cfg_scale > 1 and negative_prompt is not None
        negatives: list[str] = []
        if do_cfg:
            negatives = (
                [negative_prompt] * len(prompts)
                if isinstance(negative_prompt, str)
                else list(negative_prompt)
            )
            if len(negatives) != len(prompts):
                raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")

        start = time.perf_counter()
        self.encode_prompt([*prompts, *negatives], conditions)  # one forward for both
        cond = self.encode_prompt(prompts, conditions)
        uncond = self.encode_prompt(negatives, conditions) if do_cfg else None
        self.free("text_encoder")
        self.timings["encode"] = time.perf_counter() - start

        start = time.perf_counter()
        refs, ref_shapes = self.encode_references(vae_images)
        self.timings["encode_images"] = time.perf_counter() - start

        batch = len(prompts)
        latents = self.prepare_latents(batch, height, width, seed, latents)
        h, w = height // self.vae_scale // PATCH, width // self.vae_scale // PATCH
        sig, timesteps = self.schedule(steps, h * w, sigmas)  # mu: the noisy tokens only

        start = time.perf_counter()
        latents = self.denoise(
            latents,
            cond,
            uncond,
            sig,
            timesteps,
            [(1, h, w), *ref_shapes],
            true_cfg_scale,
            callback,
            reference_latents=mx.repeat(refs, batch, axis=0) if batch > 1 else refs,
        )
        self.timings["denoise"] = time.perf_counter() - start
        return self.finish(latents, height, width, output_type, low_memory)
