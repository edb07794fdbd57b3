"""QwenImagePipeline: text → image, with diffusers' QwenImagePipeline semantics.

``__call__`` is a short driver over four named stages, each usable on its own:

    encode_prompt -> prepare_latents -> denoise -> decode

Components load lazily on first use. The text encoder is freed as soon as the prompts are
encoded (on unified memory the peak is the largest set of components held at once, not their
sum), and each distinct prompt is encoded once per pipeline: sampling the same prompt with many
seeds never reloads the text encoder. ``low_memory=True`` frees the transformer before decoding.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import mlx.core as mx
import numpy as np

from qwen_mlx import checks, img2img
from qwen_mlx.adaln import AdaLNCache
from qwen_mlx.checks import check_size
from qwen_mlx.device import auto_precision
from qwen_mlx.errors import NonFiniteError
from qwen_mlx.loading import ModelSource, resolve
from qwen_mlx.lora import LoRA, LoraStack, fuse_weights, lora_key, read_lora, target_shapes
from qwen_mlx.memory import LEAN_DECODE_TILE, cache_limit
from qwen_mlx.models.transformer import Modulation, TransformerConfig
from qwen_mlx.precision import PrecisionPlan, component_dtype
from qwen_mlx.quantize import (
    check_bits,
    group_size_of,
    is_quantized,
    quantize_stream,
    text_encoder_bits,
    text_encoder_plan,
    transformer_plan,
)
from qwen_mlx.sampler import SchedulerConfig, euler_step, schedule, true_cfg

PATCH = 2
PROMPT_CACHE_SIZE = 64  # distinct (prompt, max_sequence_length) pairs kept per pipeline

Embeds = tuple[mx.array, mx.array | None]  # (B, T, D) float32 embeddings, (B, T) mask or None
# step_hook(step index, latents after the step) -> latents to continue from (inpaint blends here)
StepHook = Callable[[int, mx.array], mx.array]

__all__ = ["NonFiniteError", "QwenImagePipeline", "check_size", "pack_latents", "unpack_latents"]


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


def pad_embeddings(embeds: Sequence[mx.array], masks: Sequence[mx.array | None]) -> Embeds:
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


def repeat_batch(embeds: mx.array, mask: mx.array | None, n: int) -> Embeds:
    """Each prompt's embeddings n times in a row (diffusers' num_images_per_prompt order)."""
    if n == 1:
        return embeds, mask
    return mx.repeat(embeds, n, axis=0), (None if mask is None else mx.repeat(mask, n, axis=0))


def check_finite(x: mx.array, what: str) -> None:
    """Raise NonFiniteError naming ``what`` if ``x`` holds NaN or inf (before any clip)."""
    if not bool(mx.isfinite(x).all()):
        raise NonFiniteError(f"{what} is non-finite (NaN/inf)")


def _as_list(prompt: str | Sequence[str] | None) -> list[str]:
    return [] if prompt is None else [prompt] if isinstance(prompt, str) else list(prompt)


def to_pil(images: np.ndarray) -> list:
    from PIL import Image

    if not np.isfinite(images).all():  # NaN would become a black pixel
        raise NonFiniteError("the image is non-finite (NaN/inf)")
    return [Image.fromarray((im * 255).round().astype(np.uint8)) for im in images]


def image_seeds(seed: int | Sequence[int] | None, batch: int) -> list[int]:
    """One seed per image: a list as given, an int s as s, s+1, ... (so image i of seed s is
    the image of seed s+i alone), None as a fresh random base."""
    if isinstance(seed, (list, tuple)):
        return checks.check_seeds(list(seed))
    if seed is None:
        seed = random_seed()
    base = checks.check_seeds([seed], batch)[0]
    return [base + i for i in range(batch)]


def random_seed() -> int:
    return int.from_bytes(os.urandom(4), "little") % 2**31


class ZeroCondTable:
    """An adaLN table whose last row is t = 0 (Edit-2511, ``zero_cond_t``): step i's modulation
    with that row's image modulation as ``Modulation.zero`` (the reference tokens')."""

    def __init__(self, table: Sequence[Modulation]):
        self.table = table
        self.zero = [img for img, _ in table[len(table) - 1].blocks]

    def __len__(self) -> int:
        return len(self.table) - 1

    def __getitem__(self, step: int) -> Modulation:
        if not 0 <= step < len(self):
            raise IndexError(f"step {step} out of range for {len(self)} steps")
        return dataclasses.replace(self.table[step], zero=self.zero)


class QwenImagePipeline:
    """Qwen-Image text-to-image. Build with :meth:`from_pretrained`."""

    def __init__(
        self,
        source: ModelSource,
        precision: PrecisionPlan | str | None = None,
        scheduler_overrides: dict | None = None,
        compile: bool = True,
        quantize: int | None = None,
        quantize_text_encoder: int | str | None = "auto",
        adaln_cache: bool = True,
        decode_tile_size: int | None = None,
    ):
        self.source = source
        self.compile = compile
        self.quantize = check_bits(quantize) if quantize else None
        self.text_encoder_bits = text_encoder_bits(quantize_text_encoder, self.quantize)
        self.adaln_cache = adaln_cache
        self._adaln = AdaLNCache()
        mx.set_cache_limit(cache_limit())
        # A quantized (memory-lean) run decodes in tiles of 64 latent pixels (512x512 images:
        # tiled and untiled agree to rounding; about 1.8x the work of the high-resolution
        # layers), which bounds the decoder's activations; otherwise the VAE's default.
        lean = bool(self.quantize) or "quantization" in source.config("transformer")
        self.decode_tile_size = decode_tile_size or (LEAN_DECODE_TILE if lean else None)
        if precision == "auto":
            precision, _ = auto_precision()
        if isinstance(precision, str):
            component_dtype(precision, "vae")  # an unknown name fails here, before any work
        self.precision = precision
        self.scheduler_config = SchedulerConfig.from_pretrained(
            source.root / "scheduler", **(scheduler_overrides or {})
        )
        self._components: dict[str, object] = {}
        self._checked = False  # every component's config against its weights' shapes
        self._prompts: OrderedDict[tuple[str, int], Embeds] = OrderedDict()
        self._loras: list[tuple[LoRA, float]] = []
        self._lora_stack: LoraStack | None = None
        self.timings: dict[str, float] = {}
        vae_config = source.config("vae")
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
        compile: bool = True,
        quantize: int | None = None,
        quantize_text_encoder: int | str | None = "auto",
        adaln_cache: bool = True,
    ) -> QwenImagePipeline:
        """``src``: a converted folder, a diffusers-layout folder (converted in memory as it
        loads) or a hub repo id (downloaded, converted once into the qwen-mlx cache).
        ``dtype`` is the conversion dtype for unconverted sources; ``precision`` overrides the
        transformer's stored precision plan (e.g. "bfloat16"); ``compile`` runs the transformer's
        blocks through ``mx.compile`` (same results, less time).

        ``quantize`` (4 or 8) quantizes a float transformer as it loads, one block at a time
        (the same weights ``convert --quantize`` writes); ``quantize_text_encoder`` (4, 8, "none"
        or "auto": 8 bits when ``quantize`` is given) does the same for the language model.
        ``adaln_cache`` (default on) precomputes every block's modulation for the sampling
        schedule into ``$QWEN_MLX_CACHE/adaln`` and loads the transformer without its 6.8 B
        modulation parameters; False computes them from the weights each step (same result).
        """
        source = resolve(src, dtype=dtype, revision=revision, cache_dir=cache_dir)
        for name in ("transformer", "vae", "text_encoder", "tokenizer"):
            source.folder(name)  # a missing or unconverted component fails here, before any work
        return cls(
            source,
            precision,
            scheduler_overrides,
            compile,
            quantize,
            quantize_text_encoder,
            adaln_cache,
        )

    # -- components (built on first use, freed with ``free``)

    def check_components(self) -> None:
        """Check every component's config against its weights' shapes, from the headers (no
        tensor read), once: runs before the first component loads, so a mismatch is an error
        before any expensive stage, not after minutes of text encoding."""
        if not self._checked:
            from qwen_mlx.shapes import check_source

            check_source(self.source)
            self._checked = True

    def _component_dtype(self, name: str) -> str | None:
        """The dtype the precision plan gives the VAE / text encoder (None: as stored)."""
        return component_dtype(self.precision, name) if isinstance(self.precision, str) else None

    @property
    def transformer(self):
        if "transformer" not in self._components:
            from qwen_mlx.models.transformer import QwenImageTransformer

            self.check_components()
            config, weights = self.source.component("transformer")
            # LoRAs loaded before the transformer are fused into the float weights before the
            # plan folds and casts them (exact); quantized checkpoints get them beside.
            fused = bool(self._loras) and not any(k.endswith(".scales") for k in weights)
            if fused:
                stored = PrecisionPlan.from_config(config, int(config.get("num_layers", 60)))
                weights = fuse_weights(weights, self._loras, stored)
            model = QwenImageTransformer.from_weights(
                config,
                weights,
                self.precision,
                where=str(self.source.folder("transformer")),
                modulation=not self.adaln_cache,
                quantize=self.quantize,
            )
            model.compile(self.compile)
            # Unloading drops the model (it reloads clean), so no copies of originals are kept.
            self._lora_stack = LoraStack(model, keep_originals=False)
            for lora, scale in [] if fused else self._loras:
                self._lora_stack.add(self._model_lora(lora), scale)
            self._components["transformer"] = model
            mx.clear_cache()
        return self._components["transformer"]

    @property
    def vae(self):
        if "vae" not in self._components:
            from qwen_mlx.models.vae import QwenImageVAE

            self.check_components()
            config, weights = self.source.component("vae")
            self._components["vae"] = QwenImageVAE.from_weights(
                config, weights, self._component_dtype("vae"), where=str(self.source.folder("vae"))
            )
        return self._components["vae"]

    @property
    def text_encoder(self):
        if "text_encoder" not in self._components:
            from qwen_mlx.models.text_encoder import LANGUAGE_MODEL_PREFIX, QwenTextEncoder

            self.check_components()
            # Memory plan: never the text encoder and the transformer at once (the transformer
            # reloads lazily when sampling continues, with its LoRAs).
            self.free("transformer")
            dtype = self._component_dtype("text_encoder")
            config, weights = self.source.component("text_encoder", dtype=dtype)
            if self.text_encoder_bits and not is_quantized(weights):
                plan = text_encoder_plan(self.text_encoder_bits)
                lm = {k: v for k, v in weights.items() if k.startswith(LANGUAGE_MODEL_PREFIX)}
                weights = quantize_stream(lm, plan.bits_for, plan.group_size)
                quantization = {"bits": plan.bits, "group_size": plan.group_size}
                config = {**config, "quantization": quantization}
            self._components["text_encoder"] = QwenTextEncoder.from_weights(
                config,
                weights,
                self.source.folder("tokenizer"),
                dtype=dtype,
                where=str(self.source.folder("text_encoder")),
            )
        return self._components["text_encoder"]

    def free(self, *names: str) -> None:
        """Drop components (all when none named) and return their memory to the system."""
        for name in names or list(self._components):
            self._components.pop(name, None)
            if name == "transformer":
                self._lora_stack = None
        mx.clear_cache()

    # -- LoRAs

    def load_lora(self, path: str | Path, scale: float = 1.0) -> LoRA:
        """Apply a LoRA (any layout ``qwen_mlx.lora`` reads) at ``scale``; call again to stack.

        Checked against the transformer's weights at once. Before the transformer is loaded
        the LoRA is fused into its weights as they load (float32, before the precision plan
        folds and casts); on a loaded transformer it is fused in place (or run beside quantized
        linears).
        """
        scale = float(scale)
        if not np.isfinite(scale):
            raise ValueError(f"LoRA scale must be a finite number, got {scale}")
        lora = read_lora(path)
        if self._lora_stack is not None and "transformer" in self._components:
            self._lora_stack.add(self._model_lora(lora), scale)
        else:
            lora.check(self._transformer_shapes())
        self._loras.append((lora, scale))
        return lora

    def unload_loras(self) -> None:
        """Remove every LoRA: a transformer they were applied to is dropped and reloads clean."""
        if self._loras and "transformer" in self._components:
            self.free("transformer")
        self._loras = []

    @property
    def loras(self) -> list[tuple[LoRA, float]]:
        """The loaded LoRAs and their scales, in loading order."""
        return list(self._loras)

    def _model_lora(self, lora: LoRA) -> LoRA:
        """The part of ``lora`` the loaded transformer holds: under the adaLN cache the
        modulation updates go into the modulation table instead (``modulation_table``)."""
        if not self.adaln_cache:
            return lora
        from qwen_mlx.models.transformer import MODULATION_WEIGHTS

        updates = {k: v for k, v in lora.updates.items() if not MODULATION_WEIGHTS.match(k)}
        return dataclasses.replace(lora, updates=updates)

    def lora_key(self) -> str:
        """A stable identity of the loaded LoRA set ("" for none): file contents and scales.
        Anything that caches transformer outputs (e.g. modulation) must include it."""
        return lora_key(self._loras)

    def _transformer_shapes(self) -> dict[str, tuple[int, ...]]:
        """The transformer's weight shapes from its config, without loading any weight (MLX
        initialises the parameters lazily, so nothing is computed)."""
        from qwen_mlx.models.transformer import QwenImageTransformer, TransformerConfig

        config = TransformerConfig.from_dict(self.transformer_config())
        return target_shapes(QwenImageTransformer(config))

    @property
    def precision_name(self) -> str:
        """The transformer's precision plan name, without loading (or reloading) anything."""
        if "transformer" in self._components:
            return self._components["transformer"].plan.name
        if isinstance(self.precision, PrecisionPlan):
            return self.precision.name
        if isinstance(self.precision, str):
            return self.precision
        config = self.source.config("transformer")
        return PrecisionPlan.from_config(config, int(config.get("num_layers", 60))).name

    def transformer_config(self) -> dict:
        return self.source.config("transformer")

    # -- the adaLN cache

    def modulation_table(self, timesteps: mx.array) -> Sequence[Modulation]:
        """Every step's modulation for ``timesteps`` (the sigmas the transformer receives, one
        per step) from the adaLN cache, computed (streamed from disk, one block at a time, with
        the loaded LoRAs) and stored if missing. Nothing else of the transformer is loaded."""
        from qwen_mlx.adaln import cache_key, compute_modulation, weights_identity
        from qwen_mlx.models.transformer import MODULATION_WEIGHTS, QwenImageTransformer

        folder = self.source.folder("transformer")
        config, weights = self.source.component("transformer")  # lazy: headers only
        plan = QwenImageTransformer.target_plan(config, self.precision, str(folder))
        quant = transformer_plan(self.quantize) if self.quantize else None
        extra = {"converted": self.source.converted, "quantize": self.quantize}
        if not self.source.converted:
            extra["dtype"] = self.source.dtype
        zero_cond = bool(config.get("zero_cond_t"))
        if zero_cond:  # Edit-2511 also needs every block's image modulation at t = 0: one row more
            timesteps = mx.concatenate([timesteps, mx.zeros((1,), dtype=timesteps.dtype)])
        key = cache_key(weights_identity(folder), plan, timesteps, self.lora_key(), extra)

        def build() -> list[Modulation]:
            cfg = TransformerConfig.from_dict(config)
            stored = PrecisionPlan.from_config(config, cfg.num_layers)
            quantized = any(k.endswith(".scales") for k in weights)
            mods = weights
            loras = self._loras
            if loras and not quantized:  # fused into the float weights, as the model does
                mods, loras = fuse_weights(weights, loras, stored), []
            mods = {k: v for k, v in mods.items() if MODULATION_WEIGHTS.match(k)}
            return compute_modulation(
                cfg, mods, stored, plan, timesteps, group_size_of(config), quant, loras
            )

        table = self._adaln.get(key, build)
        mx.clear_cache()
        return ZeroCondTable(table) if zero_cond else table

    # -- stage 1: prompts

    def encode_prompt(self, prompts: str | Sequence[str], max_sequence_length: int = 512) -> Embeds:
        """(embeddings (B, T, 3584), mask (B, T) or None) with diffusers' semantics.

        Each distinct prompt is run through the text encoder once per pipeline (the prompts not
        seen yet go in one batch); later calls reuse the cached embeddings.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("encode_prompt needs at least one prompt")
        self._cache_prompts(prompts, max_sequence_length)
        rows = [self._prompts[(p, max_sequence_length)] for p in prompts]
        return pad_embeddings([e for e, _ in rows], [m for _, m in rows])

    def _cache_prompts(self, prompts: Sequence[str], max_sequence_length: int) -> None:
        """Encode the prompts not cached yet in one text-encoder forward; keep each unpadded."""
        if not 1 <= max_sequence_length <= 1024:
            raise ValueError(f"max_sequence_length must be in 1..1024, got {max_sequence_length}")
        checks.check_prompts(list(prompts), "prompts")
        keys = [(p, max_sequence_length) for p in prompts]
        new = list(dict.fromkeys(k for k in keys if k not in self._prompts))
        if new:
            embeds, mask = self.text_encoder.encode([p for p, _ in new], max_sequence_length)
            mx.eval(embeds)
            check_finite(embeds, "the text encoder's output")
            lengths = [embeds.shape[1]] * len(new) if mask is None else mask.sum(axis=1).tolist()
            for i, key in enumerate(new):
                row = embeds[i : i + 1, : int(lengths[i])]
                mx.eval(row)
                self._prompts[key] = (row, None)
        for key in keys:
            self._prompts.move_to_end(key)
        while len(self._prompts) > max(PROMPT_CACHE_SIZE, len(set(keys))):
            self._prompts.popitem(last=False)

    # -- stage 2: latents

    def prepare_latents(
        self,
        batch: int,
        height: int,
        width: int,
        seed: int | Sequence[int] | None = None,
        latents: mx.array | np.ndarray | None = None,
    ) -> mx.array:
        """Packed (B, L, C) float32 noise: ``latents`` as given (checked), else from the seeds."""
        h, w = height // self.vae_scale, width // self.vae_scale
        channels = int(self.transformer_config().get("in_channels", 64))
        L = (h // PATCH) * (w // PATCH)
        if latents is not None:
            latents = mx.array(latents, dtype=mx.float32)
            if tuple(latents.shape) != (batch, L, channels):
                raise ValueError(
                    f"latents must be packed (B, L, C) = ({batch}, {L}, {channels}) for this "
                    f"size and batch, got {tuple(latents.shape)}"
                )
            check_finite(latents, "latents")
            return latents
        seeds = image_seeds(seed, batch)
        if len(seeds) != batch:
            raise ValueError(f"{len(seeds)} seeds for {batch} images")
        noise = [
            pack_latents(mx.random.normal((1, h, w, channels // 4), key=mx.random.key(s)))
            for s in seeds
        ]
        return mx.concatenate(noise)

    def schedule(
        self, num_inference_steps: int, image_seq_len: int, sigmas: Sequence[float] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(sigmas with a trailing 0, timesteps) for this checkpoint's scheduler."""
        return schedule(self.scheduler_config, num_inference_steps, image_seq_len, sigmas)

    # -- stage 3: denoising

    def denoise(
        self,
        latents: mx.array,
        prompt: Embeds,
        negative: Embeds | None,
        sigmas: np.ndarray,
        timesteps: np.ndarray,
        img_shapes: Sequence[tuple[int, int, int]],
        true_cfg_scale: float = 4.0,
        callback: Callable[[int, int, mx.array], None] | None = None,
        step_hook: StepHook | None = None,
        reference_latents: mx.array | None = None,
    ) -> mx.array:
        """The sampling loop: one transformer call per step (cond and uncond batched together
        under true CFG), the Euler step in float32, then ``step_hook(i, latents)`` (which may
        replace the latents, e.g. inpaint's blend) and ``callback(i + 1, n, latents)``.

        ``img_shapes`` is one item's (frames, h, w) list: the noisy latents', then any
        ``reference_latents`` (packed, appended after the noisy tokens; Edit), whose part of the
        prediction is dropped.
        """
        batch, L = latents.shape[:2]
        embeds, mask = (
            prompt if negative is None else pad_embeddings(*zip(prompt, negative, strict=True))
        )
        if embeds.shape[0] != batch * (1 if negative is None else 2):
            raise ValueError(f"{embeds.shape[0]} prompt embeddings for {batch} latents")
        # The sigmas the transformer sees; each step's modulation is computed once for the
        # whole (doubled, under CFG) batch, or read from the adaLN cache, built before the
        # transformer loads.
        t_in = mx.array([float(t) for t in timesteps], dtype=mx.float32) / 1000.0
        table = self.modulation_table(t_in) if self.adaln_cache else None
        model = self.transformer
        rows = batch if negative is None else 2 * batch
        shapes = [list(img_shapes)] * rows
        if reference_latents is not None:
            reference_latents = reference_latents.astype(latents.dtype)  # once, not per step
        n = len(timesteps)
        for i in range(n):
            x = latents
            if reference_latents is not None:
                x = mx.concatenate([x, reference_latents], axis=1)
            if negative is not None:
                x = mx.concatenate([x, x])
            mod = table[i] if table is not None else model.modulation(t_in[i : i + 1])
            v = model(x, embeds, mask, None, shapes, modulation=mod)[:, :L]
            if negative is not None:
                v = true_cfg(v[:batch], v[batch:], true_cfg_scale)
            latents = euler_step(latents, v, sigmas[i], sigmas[i + 1])
            if step_hook is not None:
                latents = step_hook(i, latents)
            finite = mx.isfinite(latents).all()
            mx.eval(latents, finite)  # one sync per step for both
            if not finite.item():
                raise NonFiniteError(self._non_finite_message(i + 1, n))
            if callback is not None:
                callback(i + 1, n, latents)
        return latents

    def _non_finite_message(self, step: int, total: int) -> str:
        msg = f"latents became non-finite (NaN/inf) at step {step}/{total}"
        plan = self.precision_name
        if plan in ("fp16", "mixed", "float16"):
            return f"{msg} under the {plan!r} precision plan; try precision='bf16' or 'fp32'"
        return f"{msg}; the inputs or the weights produce NaN/inf (the {plan!r} plan cannot)"

    # -- image-to-image inputs

    def encode_image(self, image, height: int, width: int) -> mx.array:
        """Packed (1, L, C) normalised latents of ``image`` resized to width x height: the VAE
        posterior mean (deterministic; diffusers' ``sample_mode="argmax"``)."""
        vae = self.vae
        x = img2img.image_array(img2img.as_pil(image), width, height)
        z = vae.encode(x).astype(mx.float32)
        mean = mx.array(vae.latents_mean, dtype=mx.float32)
        std = mx.array(vae.latents_std, dtype=mx.float32)
        latents = pack_latents((z - mean) / std)
        mx.eval(latents)
        check_finite(latents, "the encoded image")
        return latents

    def encode_mask(self, mask_image, height: int, width: int) -> mx.array:
        """Packed (1, L, C) 0/1 inpainting mask (white = repaint) at latent resolution."""
        m = img2img.mask_array(img2img.as_pil(mask_image, "mask"), width, height, self.vae_scale)
        channels = int(self.transformer_config().get("in_channels", 64)) // 4
        return pack_latents(mx.broadcast_to(m, (*m.shape[:3], channels)))

    # -- stage 4: decoding

    def decode(self, latents: mx.array, height: int, width: int) -> mx.array:
        """Packed latents -> images (B, H, W, 3) in [0, 1]; non-finite output is an error
        (checked before clipping, so an overflowing decoder is never written as black)."""
        vae = self.vae
        z = unpack_latents(latents, height // self.vae_scale, width // self.vae_scale)
        mean = mx.array(vae.latents_mean, dtype=mx.float32)
        std = mx.array(vae.latents_std, dtype=mx.float32)
        tiles = {"tile_size": self.decode_tile_size} if self.decode_tile_size else {}
        image = vae.decode(z.astype(mx.float32) * std + mean, clip=False, **tiles)
        image = image.astype(mx.float32)
        mx.eval(image)
        check_finite(image, "the decoded image")
        return mx.clip(image / 2 + 0.5, 0.0, 1.0)

    # -- the driver

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        width: int | None = None,
        height: int | None = None,
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
        prompt_embeds: mx.array | None = None,
        prompt_embeds_mask: mx.array | None = None,
        negative_prompt_embeds: mx.array | None = None,
        negative_prompt_embeds_mask: mx.array | None = None,
        image=None,
        strength: float = 0.6,
        mask_image=None,
    ):
        """Generate images. Returns a list of PIL images, or with output_type="np" a float32
        array (B, H, W, 3) in [0, 1] (output_type="latent": the packed latents).

        ``latents`` are packed (B, L, 64) noise exactly as diffusers takes them. ``seed`` (one,
        or one per image) makes the noise reproducible; ``callback(step, total, latents)`` runs
        after every step. True CFG runs only with ``true_cfg_scale > 1`` and a negative prompt
        (text or embeddings), as one batched transformer call per step. ``prompt_embeds`` /
        ``negative_prompt_embeds`` (with their masks) replace the text: encode once with
        ``encode_prompt``, sample many times.

        ``image`` (PIL image, path or array) turns on image-to-image, ``mask_image`` (white =
        repaint) inpainting, with diffusers' Img2Img / Inpaint semantics (see
        ``qwen_mlx.img2img``): ``strength`` keeps the last ``ceil(steps * strength)`` steps, and
        ``latents`` is then the noise mixed into the image. Width and height default to the
        image's size rounded down to multiples of 16 (1024 without an image).
        """
        if output_type not in ("pil", "np", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")
        if image is not None:
            image = img2img.as_pil(image)
        width, height = self.output_size(width, height, image)
        self.check_request(
            prompt, negative_prompt, width, height, num_inference_steps, true_cfg_scale, seed,
            num_images_per_prompt, max_sequence_length, sigmas, prompt_embeds,
        )  # fmt: skip
        mask = None
        if image is not None:  # checked before any model runs
            img2img.first_step(len(sigmas) if sigmas is not None else num_inference_steps, strength)
            if mask_image is not None:
                mask = self.encode_mask(mask_image, height, width)
        elif mask_image is not None:
            raise ValueError("mask_image needs an image to inpaint")
        do_cfg = true_cfg_scale > 1 and (
            negative_prompt is not None or negative_prompt_embeds is not None
        )

        start = time.perf_counter()
        if do_cfg and negative_prompt_embeds is None and isinstance(negative_prompt, str):
            n = len(prompt) if isinstance(prompt, list) else 1
            n = n if prompt_embeds is None else prompt_embeds.shape[0]
            negative_prompt = [negative_prompt] * n
        texts = [*_as_list(prompt), *(_as_list(negative_prompt) if do_cfg else [])]
        if texts and prompt_embeds is None and (negative_prompt_embeds is None or not do_cfg):
            self._cache_prompts(texts, max_sequence_length)  # one forward for both
        cond = self._prompt_stage(prompt, prompt_embeds, prompt_embeds_mask, max_sequence_length)
        uncond = None
        if do_cfg:
            uncond = self._prompt_stage(
                negative_prompt,
                negative_prompt_embeds,
                negative_prompt_embeds_mask,
                max_sequence_length,
                "negative_",
            )
            if uncond[0].shape[0] != cond[0].shape[0]:
                raise ValueError(f"{uncond[0].shape[0]} negative prompts for {cond[0].shape[0]}")
        self.free("text_encoder")
        cond = repeat_batch(*cond, num_images_per_prompt)
        uncond = None if uncond is None else repeat_batch(*uncond, num_images_per_prompt)
        self.timings["encode"] = time.perf_counter() - start

        batch = cond[0].shape[0]
        latents = self.prepare_latents(batch, height, width, seed, latents)
        h, w = height // self.vae_scale // PATCH, width // self.vae_scale // PATCH
        sig, timesteps = self.schedule(num_inference_steps, h * w, sigmas)
        hook = None
        if image is not None:  # latents is the noise mixed into the image from here on
            sig, timesteps = img2img.trim_schedule(sig, timesteps, strength)
            noise, image_latents = latents, self.encode_image(image, height, width)
            latents = img2img.scale_noise(image_latents, noise, sig[0])
            if mask is not None:
                hook = img2img.inpaint_hook(image_latents, noise, mask, sig)

        start = time.perf_counter()
        latents = self.denoise(
            latents, cond, uncond, sig, timesteps, [(1, h, w)], true_cfg_scale, callback, hook
        )
        self.timings["denoise"] = time.perf_counter() - start
        mx.clear_cache()
        return self.finish(latents, height, width, output_type, low_memory)

    def finish(
        self, latents: mx.array, height: int, width: int, output_type: str, low_memory: bool
    ):
        """The end of every call: the latents as they are, or decoded (after freeing the
        transformer with ``low_memory``) to a float array or PIL images."""
        if output_type == "latent":
            return latents
        if low_memory:
            self.free("transformer")
        start = time.perf_counter()
        images = np.array(self.decode(latents, height, width))
        self.timings["decode"] = time.perf_counter() - start
        return images if output_type == "np" else to_pil(images)

    def check_request(
        self,
        prompt=None,
        negative_prompt=None,
        width: int = 1024,
        height: int = 1024,
        num_inference_steps: int = 50,
        true_cfg_scale: float = 4.0,
        seed=None,
        num_images_per_prompt: int = 1,
        max_sequence_length: int = 512,
        sigmas=None,
        prompt_embeds=None,
    ) -> None:
        """Every argument of ``__call__`` checked before anything runs (one-line ValueErrors),
        then every component's config against its weights' shapes."""
        check_size(height, width, self.vae_scale * PATCH)
        checks.check_steps(num_inference_steps)
        checks.check_cfg(true_cfg_scale)
        checks.check_int("num_images_per_prompt", num_images_per_prompt, 1, checks.MAX_IMAGES)
        checks.check_int("max_sequence_length", max_sequence_length, 1, 1024)
        if prompt_embeds is None and prompt is not None:
            n = len(checks.check_prompts(prompt))
        else:
            n = 1 if prompt_embeds is None else len(prompt_embeds)
        if negative_prompt is not None:
            checks.check_prompts(negative_prompt, "negative_prompt")
        if sigmas is not None:
            checks.check_sigmas(sigmas, num_inference_steps)
        if seed is not None:
            seeds = image_seeds(seed, n * num_images_per_prompt)
            if len(seeds) != n * num_images_per_prompt:
                raise ValueError(f"{len(seeds)} seeds for {n * num_images_per_prompt} images")
        self.check_components()

    def output_size(self, width: int | None, height: int | None, image=None) -> tuple[int, int]:
        """(width, height), checked: defaults from ``image`` (rounded down to multiples of 16),
        else 1024."""
        multiple = self.vae_scale * PATCH
        if image is not None and (width is None or height is None):
            w, h = img2img.default_size(img2img.as_pil(image), multiple)
            width, height = width or w, height or h
        width, height = width or 1024, height or 1024
        check_size(height, width, multiple)
        return width, height

    def _prompt_stage(
        self,
        prompt: str | list[str] | None,
        embeds: mx.array | None,
        mask: mx.array | None,
        max_sequence_length: int,
        which: str = "",
    ) -> Embeds:
        """Embeddings from text (cached) or as given, checked."""
        if embeds is None:
            if prompt is None:
                raise ValueError(f"pass {which}prompt or {which}prompt_embeds")
            return self.encode_prompt(prompt, max_sequence_length)
        if prompt is not None:
            raise ValueError(f"pass {which}prompt or {which}prompt_embeds, not both")
        embeds = mx.array(embeds, dtype=mx.float32)
        check_finite(embeds, f"{which}prompt_embeds")
        dim = int(self.transformer_config().get("joint_attention_dim", 3584))
        if embeds.ndim != 3 or embeds.shape[-1] != dim:
            raise ValueError(f"{which}prompt_embeds must be (B, T, {dim}), got {embeds.shape}")
        if mask is not None:
            mask = mx.array(mask)
            if tuple(mask.shape) != tuple(embeds.shape[:2]):
                raise ValueError(
                    f"{which}prompt_embeds_mask must be {tuple(embeds.shape[:2])}, got {mask.shape}"
                )
        return embeds, mask
