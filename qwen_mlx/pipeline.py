"""QwenImagePipeline: text → image, with diffusers' QwenImagePipeline semantics.

Components load lazily on first use. The text encoder is freed before the denoising loop (on
unified memory the peak is the largest set of components held at once, not their sum) and the
transformer can be freed before decoding with ``low_memory=True``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import numpy as np

from convert.io import read_json

from .loading import ModelSource, resolve
from .precision import PrecisionPlan, auto_precision, component_dtype
from .sampler import SchedulerConfig, euler_step, schedule, true_cfg

PATCH = 2


class NonFiniteError(RuntimeError):
    """Latents became NaN/inf during sampling (instead of writing a black image)."""


def check_size(height: int, width: int, multiple: int = 16) -> None:
    """Sizes must be multiples of 16 (8x VAE, 2x2 patches): say what they would round to."""
    for name, v in (("height", height), ("width", width)):
        if v < multiple:
            raise ValueError(f"{name} {v} is too small; the minimum is {multiple}")
        if v % multiple:
            lo, hi = v // multiple * multiple, (v // multiple + 1) * multiple
            raise ValueError(f"{name} {v} is not a multiple of {multiple}; use {lo} or {hi}")


def pack_latents(z: mx.array) -> mx.array:
    """(B, h, w, C) channels-last latents -> (B, h/2 * w/2, C*4), channel index c*4 + dy*2 + dx."""
    B, h, w, C = z.shape
    z = z.reshape(B, h // 2, 2, w // 2, 2, C).transpose(0, 1, 3, 5, 2, 4)
    return z.reshape(B, (h // 2) * (w // 2), C * 4)


def unpack_latents(x: mx.array, h: int, w: int) -> mx.array:
    """Inverse of pack_latents: (B, L, C*4) -> (B, h, w, C)."""
    B, _, C4 = x.shape
    x = x.reshape(B, h // 2, w // 2, C4 // 4, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(B, h, w, C4 // 4)


def pad_embeddings(
    embeds: list[mx.array], masks: list[mx.array | None]
) -> tuple[mx.array, mx.array | None]:
    """Concatenate prompt batches along the batch axis, zero-padding to the longest with masks."""
    T = max(e.shape[1] for e in embeds)
    out_e, out_m = [], []
    for e, m in zip(embeds, masks, strict=True):
        B, t, D = e.shape
        m = mx.ones((B, t), dtype=mx.int32) if m is None else m.astype(mx.int32)
        if t < T:
            e = mx.concatenate([e, mx.zeros((B, T - t, D), dtype=e.dtype)], axis=1)
            m = mx.concatenate([m, mx.zeros((B, T - t), dtype=mx.int32)], axis=1)
        out_e.append(e)
        out_m.append(m)
    mask = mx.concatenate(out_m, axis=0)
    return mx.concatenate(out_e, axis=0), (None if bool(mask.all()) else mask)


def to_pil(images: np.ndarray) -> list:
    from PIL import Image

    return [Image.fromarray((im * 255).round().astype(np.uint8)) for im in images]


class QwenImagePipeline:
    """Qwen-Image text-to-image. Build with :meth:`from_pretrained`."""

    def __init__(
        self,
        source: ModelSource,
        precision: PrecisionPlan | str | None = None,
        scheduler_overrides: dict | None = None,
    ):
        self.source = source
        if precision == "auto":
            precision, _ = auto_precision()
        if isinstance(precision, str):
            component_dtype(precision, "vae")  # an unknown name fails here, before any work
        self.precision = precision
        self.scheduler_config = SchedulerConfig.from_pretrained(
            source.root / "scheduler", **(scheduler_overrides or {})
        )
        self._components: dict[str, object] = {}
        self.timings: dict[str, float] = {}
        vae_config = read_json(source.root / "vae" / "config.json")
        # 2x spatial down-sampling per temporal stage: 8 for the released VAE.
        self.vae_scale = 2 ** len(vae_config.get("temperal_downsample", [False, True, True]))

    @classmethod
    def from_pretrained(
        cls,
        src: str | Path,
        precision: PrecisionPlan | str | None = None,
        dtype: str = "bfloat16",
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        scheduler_overrides: dict | None = None,
    ) -> QwenImagePipeline:
        """``src``: a converted folder, a diffusers-layout folder (converted in memory as it
        loads) or a hub repo id (downloaded, converted once into the qwen-mlx cache).
        ``dtype`` is the conversion dtype for unconverted sources; ``precision`` overrides the
        transformer's stored precision plan (e.g. "bfloat16")."""
        source = resolve(src, dtype=dtype, revision=revision, cache_dir=cache_dir)
        for name in ("transformer", "vae", "text_encoder", "tokenizer"):
            if not source.has(name):
                raise FileNotFoundError(f"model {src} has no {name}/ component")
        return cls(source, precision, scheduler_overrides)

    # -- components

    @property
    def transformer(self):
        if "transformer" not in self._components:
            from .models.transformer import QwenImageTransformer

            config, weights = self.source.component("transformer")
            self._components["transformer"] = QwenImageTransformer.from_weights(
                config, weights, self.precision, where=str(self.source.root / "transformer")
            )
        return self._components["transformer"]

    @property
    def vae(self):
        if "vae" not in self._components:
            from .models.vae import QwenImageVAE, VAEConfig

            config, weights = self._component_weights("vae")
            vae = QwenImageVAE(VAEConfig.from_dict(config))
            try:
                vae.load_weights(list(weights.items()), strict=True)
            except ValueError as e:
                raise ValueError(f"{self.source.root / 'vae'}: weights do not match: {e}") from e
            self._components["vae"] = vae
        return self._components["vae"]

    @property
    def text_encoder(self):
        if "text_encoder" not in self._components:
            from .models.text_encoder import QwenTextEncoder

            config, weights = self._component_weights("text_encoder")
            self._components["text_encoder"] = QwenTextEncoder.from_weights(
                config, weights, self.source.root / "tokenizer"
            )
        return self._components["text_encoder"]

    def _component_weights(self, name: str) -> tuple[dict, dict[str, mx.array]]:
        """A component's weights, cast to the dtype the precision plan gives it (if any)."""
        config, weights = self.source.component(name)
        if isinstance(self.precision, str):
            dtype = getattr(mx, component_dtype(self.precision, name))
            weights = {
                k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v
                for k, v in weights.items()
            }
        return config, weights

    def free(self, *names: str) -> None:
        """Drop components (all when none named) and return their memory to the system."""
        for name in names or list(self._components):
            self._components.pop(name, None)
        mx.clear_cache()

    # -- stages

    def encode_prompt(
        self, prompts: str | list[str], max_sequence_length: int = 512
    ) -> tuple[mx.array, mx.array | None]:
        """(embeddings (B, T, 3584), mask (B, T) or None) with diffusers' semantics."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not 1 <= max_sequence_length <= 1024:
            raise ValueError(f"max_sequence_length must be in 1..1024, got {max_sequence_length}")
        return self.text_encoder.encode(list(prompts), max_sequence_length=max_sequence_length)

    def decode(self, latents: mx.array, height: int, width: int) -> mx.array:
        """Packed latents -> images (B, H, W, 3) in [0, 1]."""
        vae = self.vae
        z = unpack_latents(latents, height // self.vae_scale, width // self.vae_scale)
        mean = mx.array(vae.latents_mean, dtype=mx.float32)
        std = mx.array(vae.latents_std, dtype=mx.float32)
        z = z.astype(mx.float32) * std + mean
        image = vae.decode(z).astype(mx.float32)
        return mx.clip(image / 2 + 0.5, 0.0, 1.0)

    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        width: int = 1024,
        height: int = 1024,
        num_inference_steps: int = 50,
        true_cfg_scale: float = 4.0,
        seed: int | list[int] | None = None,
        latents: mx.array | np.ndarray | None = None,
        num_images_per_prompt: int = 1,
        output_type: str = "pil",
        max_sequence_length: int = 512,
        callback: Callable[[int, int, mx.array], None] | None = None,
        sigmas: list[float] | None = None,
        low_memory: bool = False,
    ):
        """Generate images. Returns a list of PIL images, or with output_type="np" a float32
        array (B, H, W, 3) in [0, 1] (output_type="latent": the packed latents).

        ``latents`` are packed (B, L, 64) noise exactly as diffusers takes them. ``seed`` (one,
        or one per image) makes the noise reproducible; ``callback(step, total, latents)`` runs
        after every step. True CFG runs only with ``true_cfg_scale > 1`` and a negative prompt,
        as one batched transformer call per step.
        """
        if output_type not in ("pil", "np", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")
        check_size(height, width, self.vae_scale * PATCH)
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        if num_images_per_prompt < 1:
            raise ValueError("num_images_per_prompt must be at least 1")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch = len(prompts) * num_images_per_prompt
        do_cfg = true_cfg_scale > 1 and negative_prompt is not None
        negatives = None
        if do_cfg:
            negatives = (
                [negative_prompt] * len(prompts)
                if isinstance(negative_prompt, str)
                else list(negative_prompt)
            )
            if len(negatives) != len(prompts):
                raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")

        h, w = height // self.vae_scale, width // self.vae_scale
        seq_len = (h // PATCH) * (w // PATCH)
        channels = self.transformer_in_channels()
        latents = self._initial_latents(latents, seed, batch, h, w, channels)

        # 1. text
        start = time.perf_counter()
        embeds, mask = self.encode_prompt(prompts, max_sequence_length)
        embeds, mask = repeat_batch(embeds, mask, num_images_per_prompt)
        if do_cfg:
            neg, neg_mask = self.encode_prompt(negatives, max_sequence_length)
            neg, neg_mask = repeat_batch(neg, neg_mask, num_images_per_prompt)
            embeds, mask = pad_embeddings([embeds, neg], [mask, neg_mask])
        mx.eval(embeds, mask) if mask is not None else mx.eval(embeds)
        self.free("text_encoder")
        self.timings["encode"] = time.perf_counter() - start

        # 2. denoise
        start = time.perf_counter()
        sig, timesteps = schedule(self.scheduler_config, num_inference_steps, seq_len, sigmas)
        model = self.transformer
        shapes = [[(1, h // PATCH, w // PATCH)]] * (2 * batch if do_cfg else batch)
        for i, t in enumerate(timesteps):
            x = mx.concatenate([latents, latents]) if do_cfg else latents
            t_in = mx.full((x.shape[0],), float(t), dtype=mx.float32) / 1000.0
            v = model(x, embeds, mask, t_in, shapes)
            if do_cfg:
                v = true_cfg(v[:batch], v[batch:], true_cfg_scale)
            latents = euler_step(latents, v, sig[i], sig[i + 1])
            mx.eval(latents)
            if not bool(mx.isfinite(latents).all()):
                raise NonFiniteError(
                    f"latents became non-finite (NaN/inf) at step {i + 1}/{len(timesteps)}; "
                    f"try a different precision plan (precision={self.precision!r})"
                )
            if callback is not None:
                callback(i + 1, len(timesteps), latents)
        self.timings["denoise"] = time.perf_counter() - start
        if output_type == "latent":
            return latents
        if low_memory:
            self.free("transformer")

        # 3. decode
        start = time.perf_counter()
        images = self.decode(latents, height, width)
        mx.eval(images)
        if not bool(mx.isfinite(images).all()):
            raise NonFiniteError("the decoded image is non-finite (NaN/inf)")
        self.timings["decode"] = time.perf_counter() - start
        out = np.array(images)
        return out if output_type == "np" else to_pil(out)

    def transformer_in_channels(self) -> int:
        if "transformer" in self._components:
            return self._components["transformer"].config.in_channels
        config = read_json(self.source.root / "transformer" / "config.json")
        return int(config.get("in_channels", 64))

    @staticmethod
    def _initial_latents(latents, seed, batch: int, h: int, w: int, channels: int) -> mx.array:
        L = (h // PATCH) * (w // PATCH)
        if latents is not None:
            latents = mx.array(latents, dtype=mx.float32)
            if tuple(latents.shape) != (batch, L, channels):
                raise ValueError(
                    f"latents must be packed (B, L, C) = ({batch}, {L}, {channels}) for this "
                    f"size and batch, got {tuple(latents.shape)}"
                )
            return latents
        seeds = image_seeds(seed, batch)
        if len(seeds) != batch:
            raise ValueError(f"{len(seeds)} seeds for {batch} images")
        noise = [
            pack_latents(mx.random.normal((1, h, w, channels // 4), key=mx.random.key(s)))
            for s in seeds
        ]
        return mx.concatenate(noise)


def image_seeds(seed: int | list[int] | None, batch: int) -> list[int]:
    """One seed per image: a list as given, an int s as s, s+1, ... (so image i of seed s is
    the image of seed s+i alone), None as a fresh random base."""
    if isinstance(seed, (list, tuple)):
        return [int(s) for s in seed]
    if seed is None:
        seed = random_seed()
    return [int(seed) + i for i in range(batch)]


def random_seed() -> int:
    return int.from_bytes(os.urandom(4), "little") % 2**31


def repeat_batch(
    embeds: mx.array, mask: mx.array | None, n: int
) -> tuple[mx.array, mx.array | None]:
    """Each prompt's embeddings n times in a row (diffusers' num_images_per_prompt order)."""
    if n == 1:
        return embeds, mask
    embeds = mx.repeat(embeds, n, axis=0)
    return embeds, (None if mask is None else mx.repeat(mask, n, axis=0))
