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

It is the text-to-image pipeline with hooks, nothing copied: the same ``Components`` (its text
encoder built with the vision tower, so the memory plan, text-encoder quantization and shape
checks hold by construction), the same prompt cache (keyed by the condition images too), and
the same stages: ``prepare_latents`` (the target's noise), ``schedule`` (``mu`` from the noisy
tokens only), ``denoise_steps`` (the reference latents -- VAE posterior means, normalised and
packed -- appended after the noisy tokens at frames 1..n, the prediction sliced back) and
``decode``. What Edit adds is ``encode_prompt`` with images and ``encode_references``.

Input images are converted to RGB first (transparency composited onto white); diffusers expects
RGB images and fails on others.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence

import mlx.core as mx
import numpy as np
from PIL import Image

from qwen_mlx import checks
from qwen_mlx.errors import CheckpointError, RequestError
from qwen_mlx.image_processing import to_rgb
from qwen_mlx.pipelines.denoise import CancelToken, Embeds, StepEvent, run
from qwen_mlx.pipelines.txt2img import PATCH, QwenImagePipeline, _image_key, check_size
from qwen_mlx.request import GenerationRequest

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
        raise RequestError(
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
        raise RequestError("image must be a PIL image or a list of PIL images")
    if not images:
        raise RequestError("Edit needs an input image")
    return list(images)


class QwenImageEditPipeline(QwenImagePipeline):
    """Qwen-Image-Edit, Edit-2509 and Edit-2511. Build with :meth:`from_pretrained`."""

    supports_controlnet = False  # the InstantX ControlNets are trained for text-to-image

    # Target areas (pixels); tests shrink them to keep tiny models fast.
    vae_image_area: int = VAE_IMAGE_AREA
    condition_image_area: int = CONDITION_IMAGE_AREA
    required_components = (*QwenImagePipeline.required_components, "processor")
    default_strength = None

    def __init__(self, source, *args, **kwargs):
        self.check_source(source)
        self.plus = EDIT_CLASSES[source.index.get("_class_name")]
        super().__init__(source, *args, **kwargs)
        self._references: tuple[str, mx.array, list] | None = None  # the last images' latents

    @classmethod
    def check_source(cls, source) -> None:
        cls_name = source.index.get("_class_name")
        if cls_name not in EDIT_CLASSES:
            raise CheckpointError(
                f"{source.name} is a {cls_name or 'checkpoint without _class_name'}, not a "
                f"Qwen-Image-Edit checkpoint ({' or '.join(EDIT_CLASSES)}); use QwenImagePipeline"
            )

    def text_encoder_builder(self):
        """The text encoder with its vision tower (everything else is ``Components``')."""
        plus = self.plus

        def build(source, config, weights, dtype):
            from qwen_mlx.models.edit_prompt import QwenEditTextEncoder

            return QwenEditTextEncoder.from_weights(
                config,
                weights,
                source.folder("tokenizer"),
                source.folder("processor"),
                plus=plus,
                dtype=dtype,
                where=str(source.folder("text_encoder")),
            )

        return build

    @property
    def flavour(self) -> str:
        """ "edit", "edit-2509" or "edit-2511" (what the checkpoint is)."""
        if not self.plus:
            return "edit"
        return "edit-2511" if self.transformer_config().get("zero_cond_t") else "edit-2509"

    @property
    def default_steps(self) -> int:
        return self.lightning or DEFAULT_STEPS[self.plus]

    # -- images

    def prepare_images(
        self, image: Image.Image | Sequence[Image.Image]
    ) -> tuple[list[Image.Image], list[Image.Image]]:
        """(condition images for the vision tower, images for the VAE), sized as diffusers does."""
        images = _as_images(image)
        if not self.plus and len(images) != 1:
            raise RequestError(
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
        parts, shapes = [], []
        for im in vae_images:
            x = mx.array(np.asarray(im, dtype=np.float32) / np.float32(255.0))[None] * 2.0 - 1.0
            packed = self.vae_latents(x)
            parts.append(packed)
            shapes.append(
                (1, x.shape[1] // self.vae_scale // PATCH, x.shape[2] // self.vae_scale // PATCH)
            )
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
        sized by ``prepare_images``). The base pipeline's prompt cache, keyed by the images
        too: each distinct (prompt, images) pair is encoded once per pipeline; the new ones go
        through the text encoder in one batch with one vision-tower pass. Prompts are never
        truncated (as in diffusers' Edit pipelines)."""
        if images is None:
            raise RequestError("Edit prompts need the input image(s)")
        return self._cached_prompts(prompts, max_sequence_length, list(images))

    def _encode_texts(self, prompts: list[str], max_sequence_length: int, images) -> Embeds:
        return self.text_encoder.encode(prompts, list(images))

    # -- requests

    def request_size(self, req: GenerationRequest) -> tuple[int, int]:
        if not req.images:
            raise RequestError("Edit needs an input image")
        height, width = self.edit_size(list(req.images), req.height, req.width)
        return width, height

    def encode_sizes(self, req: GenerationRequest) -> tuple[tuple[int, int], ...]:
        """Each reference image's size for the VAE (``prepare_images``)."""
        images = _as_images(list(req.images))[: None if self.plus else 1]
        return tuple(edit_dimensions(self.vae_image_area, *im.size) for im in images)

    def reference_tokens(self, req: GenerationRequest) -> int:
        """The references' latent tokens, which join every step's sequence."""
        cell = self.vae_scale * PATCH
        return sum((w // cell) * (h // cell) for w, h in self.encode_sizes(req))

    def check_images(self, req: GenerationRequest) -> None:
        if req.mask is not None or req.strength is not None:
            raise RequestError("Edit takes no mask or strength (those are img2img/inpaint)")
        self.prepare_images(list(req.images))

    def metadata(self, req: GenerationRequest, seed: int) -> dict:
        return {**super().metadata(req, seed), "flavour": self.flavour}

    def sample(
        self, req: GenerationRequest, seed: int, cancel: CancelToken | None = None
    ) -> Iterator[StepEvent]:
        images = list(req.images) if self.plus else req.images[0]
        negative = req.negative_prompt if req.cfg_on else None
        return self._edit_steps(
            images, req.prompt, negative, req.steps, req.cfg, seed, None, req.height,
            req.width, list(req.sigmas) if req.sigmas else None, cancel,
        )  # fmt: skip

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
        cancel: CancelToken | None = None,
    ):
        """Edit ``image`` (one PIL image, or a list for Edit-2509/2511) as ``prompt`` says.

        Returns PIL images, or with output_type="np" float32 (B, H, W, 3) in [0, 1]
        (output_type="latent": packed latents). ``num_inference_steps`` defaults to 50 (Edit) or
        40 (2509/2511). True CFG runs when ``true_cfg_scale > 1`` and ``negative_prompt`` is not
        None (default " ", as the official examples). ``latents``: packed (B, L, C) noise for
        the target; ``height``/``width`` default to about 1024x1024 at the input's aspect.
        """
        if output_type not in ("pil", "np", "latent"):
            raise RequestError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")
        height, width = self.edit_size(image, height, width)
        steps = self._edit_steps(
            image, prompt, negative_prompt, num_inference_steps, true_cfg_scale, seed, latents,
            height, width, sigmas, cancel,
        )  # fmt: skip
        latents = run(steps, latents, callback)
        return self.finish(latents, height, width, output_type, low_memory)

    def _edit_steps(
        self,
        image,
        prompt,
        negative_prompt,
        num_inference_steps,
        true_cfg_scale,
        seed,
        latents,
        height,
        width,
        sigmas,
        cancel,
    ) -> Iterator[StepEvent]:
        """Every Edit stage up to the last denoising step: the one path of ``__call__`` and
        ``generate``."""
        steps = self.default_steps if num_inference_steps is None else num_inference_steps
        checks.check_steps(steps)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise RequestError("prompt must be a string or a list of strings")
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
                raise RequestError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")

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
        refs = mx.repeat(refs, batch, axis=0) if batch > 1 else refs
        yield from self._timed_denoise(
            latents, cond, uncond, sig, timesteps, [(1, h, w), *ref_shapes], true_cfg_scale,
            None, refs, cancel,
        )  # fmt: skip
