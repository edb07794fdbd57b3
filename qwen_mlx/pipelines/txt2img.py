"""QwenImagePipeline: text → image (and img2img, inpaint), with diffusers' semantics.

``__call__`` is a short driver over four named stages, each usable on its own:

    encode_prompt -> prepare_latents -> denoise_steps (a generator) -> decode

``Components`` (``pipelines/components.py``) owns the models: loaded lazily, freed by stage
(the text encoder never beside the transformer), quantized, shape-checked and priced by the
memory plan. Each distinct prompt is encoded once per pipeline: sampling the same prompt with
many seeds never reloads the text encoder. ``generate(request)`` is the one path the CLI and
the server take: a generator of ``StepEvent`` and ``ImageResult``.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import mlx.core as mx
import numpy as np

from qwen_mlx import checks, control, memory, step_cache
from qwen_mlx.checks import check_size
from qwen_mlx.errors import NonFiniteError, QwenMLXError, RequestError
from qwen_mlx.loading import ModelSource, resolve
from qwen_mlx.lora import LoRA
from qwen_mlx.pipelines import img2img
from qwen_mlx.pipelines.components import Components, ZeroCondTable
from qwen_mlx.pipelines.denoise import (
    CancelToken,
    Denoiser,
    Embeds,
    StepEvent,
    StepHook,
    pad_embeddings,
    run,
)
from qwen_mlx.pipelines.sampler import LIGHTNING_SCHEDULER, SchedulerConfig, schedule
from qwen_mlx.precision import PrecisionPlan
from qwen_mlx.request import GenerationRequest, ImageResult
from qwen_mlx.step_cache import FirstBlockCacheConfig as FBCConfig
from qwen_mlx.step_cache import MagCacheConfig, StepCacheConfig, StepCacheRun, describe

PATCH = 2
PROMPT_CACHE_SIZE = 64  # distinct (prompt, max_sequence_length, images) keys kept per pipeline
LIGHTNING_STEPS = (4, 8)

__all__ = [
    "NonFiniteError",
    "QwenImagePipeline",
    "ZeroCondTable",
    "check_size",
    "pack_latents",
    "pad_embeddings",
    "unpack_latents",
]


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


class QwenImagePipeline:
    """Qwen-Image text-to-image (img2img and inpaint with an ``image``). Build with
    :meth:`from_pretrained`."""

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
        lightning: int | None = None,
        parallel: str | None = None,
    ):
        if lightning is not None and lightning not in LIGHTNING_STEPS:
            raise RequestError(f"lightning must be 4 or 8 (the LoRA's steps), got {lightning}")
        self.source = source
        self.lightning = lightning
        self.components = Components(
            source,
            precision,
            compile,
            quantize,
            quantize_text_encoder,
            adaln_cache,
            decode_tile_size,
            self.text_encoder_builder(),
        )
        overrides = {**(LIGHTNING_SCHEDULER if lightning else {}), **(scheduler_overrides or {})}
        self.scheduler_config = SchedulerConfig.from_pretrained(
            source.root / "scheduler", **overrides
        )
        self._prompts: OrderedDict[tuple, Embeds] = OrderedDict()
        self.step_cache: StepCacheConfig | None = None  # enable_cache / disable_cache
        self.last_cache: StepCacheRun | None = None  # the last run's cache: its full passes
        self.last_calibration: Path | None = None  # where the last MagCache calibration went
        self._cache_by_seed: dict[int, StepCacheRun | None] = {}
        self.timings: dict[str, float] = {}
        self.vae_scale = self.components.vae_scale
        self.parallel, self.world = parallel, None
        if parallel is not None:  # several processes under mlx.launch (qwen_mlx.distributed)
            from qwen_mlx.distributed import World, check_parallel

            self.parallel = check_parallel(parallel)
            self.world = World.init()

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
        lightning: int | None = None,
        parallel: str | None = None,
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
        ``lightning`` (4 or 8): the Lightning LoRAs' scheduler, and that many steps at CFG 1 by
        default (load the LoRA itself with ``load_lora``).
        ``parallel`` ("auto", "cfg", "seeds" or "tensor"): under ``mlx.launch``, the processes
        of the group ``mx.distributed.init()`` returns generate as one job (docs/distributed.md);
        a process started alone is a group of one.
        """
        source = resolve(src, dtype=dtype, revision=revision, cache_dir=cache_dir)
        cls.check_source(source)
        for name in cls.required_components:
            source.folder(name)  # a missing or unconverted component fails here, before any work
        return cls(
            source,
            precision,
            scheduler_overrides,
            compile,
            quantize,
            quantize_text_encoder,
            adaln_cache,
            lightning=lightning,
            parallel=parallel,
        )

    # -- what a pipeline states about itself (hooks)

    required_components: tuple[str, ...] = ("transformer", "vae", "text_encoder", "tokenizer")

    @classmethod
    def check_source(cls, source: ModelSource) -> None:
        """Refuse a checkpoint this pipeline cannot run (hook), before anything loads."""

    def text_encoder_builder(self):
        """The text encoder's constructor for ``Components`` (None: the language model alone)."""
        return None

    cfg_split = None  # set by qwen_mlx.distributed under --parallel cfg (the Denoiser's hook)
    serving = False  # set by the server: under mlx.launch, --parallel auto takes every request
    memory_guard = True  # under mlx.launch, refuse a job whose per-process plan does not fit
    default_strength: float | None = 0.6  # img2img / inpaint (None: the pipeline takes none)

    @property
    def default_steps(self) -> int:
        return self.lightning or 50

    @property
    def default_cfg(self) -> float:
        return 1.0 if self.lightning else 4.0

    # -- the components (``Components`` owns them; these read through)

    @property
    def transformer(self):
        return self.components.transformer

    @property
    def vae(self):
        return self.components.vae

    @property
    def text_encoder(self):
        return self.components.text_encoder

    def free(self, *names: str) -> None:
        """Drop components (all when none named) and return their memory to the system."""
        self.components.free(*names)

    def check_components(self) -> None:
        """Every component's config against its weights' shapes (headers only), once."""
        self.components.check()

    @property
    def precision(self):
        return self.components.precision

    @property
    def precision_name(self) -> str:
        """The transformer's precision plan name, without loading (or reloading) anything."""
        return self.components.precision_name

    @property
    def quantize(self) -> int | None:
        return self.components.quantize

    @property
    def adaln_cache(self) -> bool:
        return self.components.adaln_cache

    @property
    def decode_tile_size(self) -> int | None:
        return self.components.decode_tile_size

    def transformer_config(self) -> dict:
        return self.components.transformer_config()

    def modulation_table(self, timesteps: mx.array):
        return self.components.modulation_table(timesteps)

    # -- LoRAs

    def load_lora(self, path: str | Path, scale: float = 1.0) -> LoRA:
        """Apply a LoRA (any layout ``qwen_mlx.lora`` reads) at ``scale``; call again to stack.

        Checked against the transformer's weights at once. Before the transformer is loaded
        the LoRA is fused into its weights as they load (float32, before the precision plan
        folds and casts them); on a loaded transformer it is fused in place (or run beside
        quantized linears).
        """
        return self.components.load_lora(path, scale)

    def unload_loras(self) -> None:
        """Remove every LoRA: a transformer they were applied to is dropped and reloads clean."""
        self.components.unload_loras()

    @property
    def loras(self) -> list[tuple[LoRA, float]]:
        """The loaded LoRAs and their scales, in loading order."""
        return self.components.loras

    def lora_key(self) -> str:
        return self.components.lora_key()

    # -- ControlNet

    supports_controlnet = True  # hook: Edit takes none

    def load_controlnet(self, path: str | Path, revision: str | None = None) -> None:
        """Use a ControlNet (a ``QwenImageControlNetModel`` folder in diffusers' layout or
        converted, or a hub id) for calls with a ``control_image``; it replaces any previous
        one (several at once are refused, as diffusers refuses several Union ControlNets).
        Checked at once against the transformer (widths) and its own weights (shapes); its
        weights load when a call needs them."""
        if not self.supports_controlnet:
            raise RequestError(f"{type(self).__name__} takes no ControlNet (text-to-image only)")
        self.components.load_controlnet(path, revision)

    def unload_controlnet(self) -> None:
        self.components.unload_controlnet()

    @property
    def controlnet(self):
        return self.components.controlnet

    def check_control(self, images: Sequence, mask) -> None:
        """Control inputs against the loaded ControlNet, before anything loads."""
        from qwen_mlx.models.controlnet import ControlNetConfig

        info = self.components.controlnet_info
        if not images:
            if mask is not None:
                raise RequestError("control_mask needs a control_image (the image to complete)")
            return
        if info is None:
            raise RequestError("control_image needs a ControlNet: call load_controlnet first")
        cfg = ControlNetConfig.from_dict(info["config"])
        if mask is not None and not cfg.inpainting:
            raise RequestError(
                f"control_mask goes with the Inpainting ControlNet; {info['name']} has no extra "
                "condition channels"
            )
        if cfg.inpainting and mask is None:
            raise RequestError(f"the Inpainting ControlNet {info['name']} needs control_mask")
        if cfg.inpainting and len(images) != 1:
            raise RequestError("the Inpainting ControlNet takes one control_image")

    def control_run(
        self, images, mask, scale, start, end, height: int, width: int, timesteps: np.ndarray
    ) -> control.ControlRun:
        """One run's ControlNet inputs: each condition encoded, the windows, the adaLN table
        (built before the ControlNet loads, so its modulation weights never do)."""
        mean = mx.array(self.vae.latents_mean, dtype=mx.float32)
        std = mx.array(self.vae.latents_std, dtype=mx.float32)

        def encode(x: mx.array) -> mx.array:
            return (self.vae.encode(x).astype(mx.float32) - mean) / std

        conditions = []
        for image in images:
            if mask is not None:
                cond = control.inpaint_condition(encode, image, mask, width, height, self.vae_scale)
            else:
                cond = control.union_condition(encode, image, width, height)
            mx.eval(cond)
            check_finite(cond, "the encoded control image")
            conditions.append(cond)
        scales, starts, ends = control.checked(len(images), scale, start, end)
        t_in = mx.array([float(t) for t in timesteps], dtype=mx.float32) / 1000.0
        table = self.components.controlnet_table(t_in) if self.adaln_cache else None
        model = self.components.controlnet
        return control.ControlRun(model, conditions, scales, starts, ends, t_in, table)

    # -- step caches (``qwen_mlx.step_cache``, docs/speed.md)

    def enable_cache(self, config: StepCacheConfig) -> None:
        """Skip transformer passes from the next run on: a ``FirstBlockCacheConfig``,
        ``TaylorSeerCacheConfig`` or ``MagCacheConfig`` (diffusers' fields and decisions, per
        CFG branch). A MagCache without ``mag_ratios`` reads the ratios a ``calibrate=True`` run
        stored for this checkpoint, LoRAs and schedule."""
        if not isinstance(config, StepCacheConfig):
            raise RequestError(f"not a step cache config: {config!r}")
        self.step_cache = config

    def disable_cache(self) -> None:
        self.step_cache = None

    def request_timesteps(self, req: GenerationRequest) -> np.ndarray:
        """The timesteps a prepared request samples (img2img keeps the last ones)."""
        h, w = req.height // self.vae_scale // PATCH, req.width // self.vae_scale // PATCH
        sig, timesteps = self.schedule(req.steps, h * w, list(req.sigmas) if req.sigmas else None)
        if req.images and self.default_strength is not None:
            sig, timesteps = img2img.trim_schedule(sig, timesteps, req.strength)
        return timesteps

    def check_cache(self, req: GenerationRequest) -> None:
        """A MagCache that needs stored ratios finds them (before any model loads)."""
        self.step_cache_run(self.request_timesteps(req), 2 if req.cfg_on else 1)

    def calibration_key(self, timesteps: np.ndarray, branches: int) -> str:
        from qwen_mlx.adaln import weights_identity

        folder = weights_identity(self.source.folder("transformer"))
        return step_cache.calibration_key(folder, timesteps, branches, self.lora_key())

    def step_cache_run(
        self, timesteps: np.ndarray, branches: int, only: str | None = None
    ) -> StepCacheRun | None:
        """A fresh cache state for one run (None: no cache); ``only``: see StepCacheRun."""
        config = self.step_cache
        if config is None:
            return None
        ratios = None
        if isinstance(config, MagCacheConfig) and config.mag_ratios is None:
            if not config.calibrate:
                ratios = step_cache.load_calibration(self.calibration_key(timesteps, branches))
                if ratios is None:
                    raise QwenMLXError(
                        f"no MagCache ratios for this checkpoint and schedule ({len(timesteps)} "
                        f"steps, CFG {'on' if branches == 2 else 'off'}): run it once with "
                        "--cache-calibrate (Python: MagCacheConfig(calibrate=True))"
                    )
        return StepCacheRun(config, len(timesteps), branches, ratios, only)

    def _cached_steps(self, steps, run: StepCacheRun, timesteps) -> Iterator[StepEvent]:
        self.last_cache = run
        yield from steps
        if run.calibrated:  # MagCache calibration: store the ratios for later runs
            key = self.calibration_key(timesteps, len(run.names))
            info = {"model": self.source.name, "steps": len(timesteps)}
            self.last_calibration = step_cache.save_calibration(key, run.calibrated, info)

    # -- stage 1: prompts

    def encode_prompt(self, prompts: str | Sequence[str], max_sequence_length: int = 512) -> Embeds:
        """(embeddings (B, T, 3584), mask (B, T) or None) with diffusers' semantics.

        Each distinct prompt is run through the text encoder once per pipeline (the prompts not
        seen yet go in one batch); later calls reuse the cached embeddings.
        """
        return self._cached_prompts(prompts, max_sequence_length)

    def _cached_prompts(self, prompts, max_sequence_length: int, images=None) -> Embeds:
        """The prompt cache every pipeline shares: each distinct (prompt, length, images) is
        encoded once, the new ones in one text-encoder forward (``_encode_texts``), and kept
        unpadded; the result is padded to the longest."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise RequestError("encode_prompt needs at least one prompt")
        checks.check_prompts(prompts, "prompts")
        checks.check_int("max_sequence_length", max_sequence_length, 1, 1024)
        tag = (max_sequence_length, _image_key(images))
        keys = [(p, *tag) for p in prompts]
        new = list(dict.fromkeys(k for k in keys if k not in self._prompts))
        if new:
            embeds, mask = self._encode_texts([k[0] for k in new], max_sequence_length, images)
            mx.eval(embeds)
            check_finite(embeds, "the text encoder's output")
            lengths = [embeds.shape[1]] * len(new) if mask is None else mask.sum(axis=1).tolist()
            for i, key in enumerate(new):
                row = embeds[i : i + 1, : int(lengths[i])]
                mx.eval(row)
                self._prompts[key] = (row, None)
        for key in keys:
            self._prompts.move_to_end(key)
        rows = [self._prompts[k] for k in keys]
        while len(self._prompts) > max(PROMPT_CACHE_SIZE, len(set(keys))):
            self._prompts.popitem(last=False)
        return pad_embeddings([e for e, _ in rows], [m for _, m in rows])

    def _encode_texts(self, prompts: list[str], max_sequence_length: int, images) -> Embeds:
        """One text-encoder forward (hook: Edit passes its condition images)."""
        return self.text_encoder.encode(prompts, max_sequence_length)

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
                raise RequestError(
                    f"latents must be packed (B, L, C) = ({batch}, {L}, {channels}) for this "
                    f"size and batch, got {tuple(latents.shape)}"
                )
            check_finite(latents, "latents")
            return latents
        seeds = image_seeds(seed, batch)
        if len(seeds) != batch:
            raise RequestError(f"{len(seeds)} seeds for {batch} images")
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

    def denoiser(
        self,
        prompt: Embeds,
        negative: Embeds | None,
        timesteps: np.ndarray,
        img_shapes: Sequence[tuple[int, int, int]],
        true_cfg_scale: float = 4.0,
        reference_latents: mx.array | None = None,
        control_run: control.ControlRun | None = None,
    ) -> Denoiser:
        """One run's ``Denoiser``. The adaLN table (when on) is built before the transformer
        loads, so the modulation weights and the rest are never both in memory."""
        if control_run is not None and isinstance(self.step_cache, (FBCConfig, MagCacheConfig)):
            # diffusers adds the residuals of skipped blocks too; not emulated yet
            raise RequestError(
                "fbcache and magcache do not run with a ControlNet yet (use taylorseer)"
            )
        only = None  # --parallel cfg: this process's branch keeps its own cache
        if self.step_cache is not None and negative is not None and self.cfg_split is not None:
            if isinstance(self.step_cache, MagCacheConfig) and self.step_cache.calibrate:
                raise RequestError(
                    "MagCache calibration needs both CFG branches in one process: calibrate "
                    "without --parallel cfg (the stored ratios then serve it)"
                )
            only = step_cache.BRANCHES[self.cfg_split.branch]
        cache = self.step_cache_run(timesteps, 1 if negative is None else 2, only)
        t_in = mx.array([float(t) for t in timesteps], dtype=mx.float32) / 1000.0
        table = self.modulation_table(t_in) if self.adaln_cache else None
        den = Denoiser(
            self.transformer,
            prompt,
            negative,
            img_shapes,
            timesteps,
            true_cfg_scale,
            table,
            reference_latents,
            non_finite_message=self._non_finite_message,
            cfg_split=self.cfg_split,
            step_cache=cache,
        )
        if control_run is not None:  # the residuals of the positive prompt, for both CFG halves
            den.transformer_kwargs.append(control_run.kwargs(den))
        return den

    def denoise_steps(
        self,
        latents: mx.array,
        prompt: Embeds,
        negative: Embeds | None,
        sigmas: np.ndarray,
        timesteps: np.ndarray,
        img_shapes: Sequence[tuple[int, int, int]],
        true_cfg_scale: float = 4.0,
        step_hook: StepHook | None = None,
        reference_latents: mx.array | None = None,
        cancel: CancelToken | None = None,
        control_run: control.ControlRun | None = None,
    ) -> Iterator[StepEvent]:
        """The sampling loop as a generator of ``StepEvent`` (see ``pipelines/denoise.py``):
        one transformer call per step (cond and uncond batched together under true CFG), the
        Euler step in float32, then ``step_hook(i, latents)``.

        ``img_shapes`` is one item's (frames, h, w) list: the noisy latents', then any
        ``reference_latents`` (packed, appended after the noisy tokens; Edit), whose part of the
        prediction is dropped.
        """
        den = self.denoiser(
            prompt, negative, timesteps, img_shapes, true_cfg_scale, reference_latents, control_run
        )
        steps = den.steps(latents, sigmas, step_hook, cancel)
        self.last_cache = None
        if den.step_cache is None:
            return steps
        return self._cached_steps(steps, den.step_cache, timesteps)

    def denoise(self, latents: mx.array, *args, callback=None, **kwargs) -> mx.array:
        """``denoise_steps`` run to the end: the final latents (``callback(step, total,
        latents)`` after each step)."""
        return run(self.denoise_steps(latents, *args, **kwargs), latents, callback)

    def _non_finite_message(self, step: int, total: int) -> str:
        from qwen_mlx.messages import non_finite_message

        return non_finite_message(step, total, self.precision_name, len(self.loras))

    # -- image inputs (img2img, inpaint, Edit's references)

    def vae_latents(self, x: mx.array) -> mx.array:
        """Packed (1, L, C) normalised latents of an image batch (1, H, W, 3) in [-1, 1]: the
        VAE posterior mean (diffusers' ``sample_mode="argmax"``), (z - mean) / std."""
        vae = self.vae
        z = vae.encode(x).astype(mx.float32)
        mean = mx.array(vae.latents_mean, dtype=mx.float32)
        std = mx.array(vae.latents_std, dtype=mx.float32)
        return pack_latents((z - mean) / std)

    def encode_image(self, image, height: int, width: int) -> mx.array:
        """Packed (1, L, C) normalised latents of ``image`` resized to width x height."""
        latents = self.vae_latents(img2img.image_array(img2img.as_pil(image), width, height))
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

    # -- requests: one object, validated once, for the CLI, the server and Python

    def prepare(self, request: GenerationRequest) -> GenerationRequest:
        """``request`` validated and completed: the model's defaults (size, steps, CFG), a
        random seed if none, input images read. Raises a one-line error before anything
        loads; idempotent."""
        req = request.validate(multiple=self.vae_scale * PATCH)
        images = tuple(img2img.as_pil(im) for im in req.images)
        mask = img2img.as_pil(req.mask, "mask") if req.mask is not None else None
        req = req.replace(images=images, mask=mask)
        if req.control_images or req.control_mask is not None:
            controls = [img2img.as_pil(im, "control image") for im in req.control_images]
            if req.control_preprocess and not req.control_preprocessed:  # once: idempotent
                controls = [control.preprocess(req.control_preprocess, im) for im in controls]
            cmask = req.control_mask
            cmask = img2img.as_pil(cmask, "control mask") if cmask is not None else None
            self.check_control(controls, cmask)
            req = req.replace(
                control_images=tuple(controls), control_mask=cmask, control_preprocessed=True
            )
        width, height = self.request_size(req)
        steps = self.default_steps if req.steps is None else req.steps
        req = req.replace(
            width=width,
            height=height,
            steps=steps,
            cfg=self.default_cfg if req.cfg is None else req.cfg,
            seeds=req.seeds or (random_seed(),),
        )
        if req.images and req.strength is None and self.default_strength is not None:
            req = req.replace(strength=self.default_strength)
        req.validate(multiple=self.vae_scale * PATCH)  # the resolved values
        self.check_images(req)
        self.check_components()
        return req

    def request_size(self, req: GenerationRequest) -> tuple[int, int]:
        """(width, height) of a request (hook: Edit sizes from its input images)."""
        return self.output_size(req.width, req.height, req.images[0] if req.images else None)

    def check_images(self, req: GenerationRequest) -> None:
        """The input images a request may have (hook): img2img/inpaint takes one."""
        if len(req.images) > 1:
            raise RequestError(f"img2img takes one image, got {len(req.images)}")
        if req.images:
            strength = 0.6 if req.strength is None else req.strength
            img2img.first_step(len(req.sigmas) if req.sigmas else req.steps, strength)
        if req.mask is not None:
            self.encode_mask(req.mask, req.height, req.width)  # checks the mask

    def memory_request(
        self, req: GenerationRequest, split: str | None = None, processes: int = 1
    ) -> memory.Request:
        """What a prepared request asks of memory (the one place it is built); ``split``:
        of one process of an N-process job in that ``--parallel`` mode."""
        return self.components.memory_request(
            req.width, req.height, req.cfg_on, req.max_sequence_length, req.low_memory,
            controlnet=bool(req.control_images), split=split, processes=processes,
            encode_sizes=self.encode_sizes(req), reference_tokens=self.reference_tokens(req),
        )  # fmt: skip

    def encode_sizes(self, req: GenerationRequest) -> tuple[tuple[int, int], ...]:
        """(width, height) of each image the VAE encodes for ``req`` (hook: Edit's
        references): img2img and inpaint encode the input at the output size."""
        return ((req.width, req.height),) if req.images else ()

    def reference_tokens(self, req: GenerationRequest) -> int:
        """Image tokens beside the noisy latents in every step (hook: Edit's references)."""
        return 0

    def memory_estimate(self, req: GenerationRequest, **parallel) -> memory.Estimate:
        return memory.source_estimate(self.source, self.memory_request(req, **parallel))

    def check_memory(self, req: GenerationRequest, **parallel) -> memory.Estimate:
        """The estimate, or ``MemoryLimitError`` with what would fit (``parallel``: ``split``
        and ``processes``, see ``memory_request``)."""
        return memory.check_source(self.source, self.memory_request(req, **parallel))

    def metadata(self, req: GenerationRequest, seed: int) -> dict:
        """What each PNG carries: the request, the seed and how the model ran."""
        from qwen_mlx import __version__

        meta = req.metadata()
        meta.update(
            seed=seed,
            model=self.source.name,
            precision=self.precision_name,
            quantize=self.quantize,
            adaln_cache=self.adaln_cache,
            lightning=self.lightning,
            **self.cache_metadata(self._cache_by_seed.get(seed)),
            loras=[
                {"name": x.name, "path": str(x.path), "scale": sc, "sha256": x.digest}
                for x, sc in self.loras
            ],
            version=__version__,
        )
        if req.control_images:
            meta["control"]["controlnet"] = self.components.controlnet_info["name"]
        return meta

    @staticmethod
    def cache_metadata(run: StepCacheRun | None) -> dict:
        """Which step cache ran and how many full passes it took (of steps x CFG branches)."""
        if run is None:
            return {"cache": None}
        return {"cache": describe(run.config), "cache_full_passes": run.total_full_passes,
                "cache_passes": run.passes}  # fmt: skip

    def generate(
        self, request: GenerationRequest, cancel: CancelToken | None = None, local: bool = False
    ) -> Iterator[StepEvent | ImageResult]:
        """Every seed of ``request``, one after another: its ``StepEvent``s, then its
        ``ImageResult``. With ``low_memory`` every seed is sampled first, then the transformer
        freed and all decoded. A cancelled run raises ``Cancelled`` (nothing is returned).

        Under ``mlx.launch`` with ``parallel`` set, the processes run it as one job (see
        ``qwen_mlx.distributed``): rank 0's generator yields every image, the others' none.
        ``local``: this process's share only (what the job runs on each rank)."""
        if self.world is not None and self.world.distributed and not local:
            from qwen_mlx.distributed import run_generate

            yield from run_generate(self, request, cancel)
            return
        req = self.prepare(request)
        self.check_cache(req)
        self._cache_by_seed = {}
        pending = []
        for seed in req.seeds:
            latents = None
            for event in self.sample(req, seed, cancel):
                event.seed = seed
                latents = event.latents
                yield event
            self._cache_by_seed[seed] = self.last_cache  # a seed's run is the same every time
            if req.low_memory:
                pending.append((seed, latents))
            else:
                yield self._result(req, seed, latents, cancel)
        if pending:
            self.free("transformer", "controlnet")
            for seed, latents in pending:
                yield self._result(req, seed, latents, cancel)

    def _result(self, req, seed: int, latents: mx.array, cancel) -> ImageResult:
        if cancel is not None:
            cancel.check()
        start = time.perf_counter()
        image = to_pil(np.array(self.decode(latents, req.height, req.width)))[0]
        self.timings["decode"] = time.perf_counter() - start
        return ImageResult(seed, image, self.metadata(req, seed))

    def sample(
        self, req: GenerationRequest, seed: int, cancel: CancelToken | None = None
    ) -> Iterator[StepEvent]:
        """One seed of a prepared request: its denoising steps (hook: Edit's own stages)."""
        return self._steps(
            req.prompt,
            req.negative_prompt if req.cfg_on else None,
            req.width,
            req.height,
            req.steps,
            req.cfg,
            seed,
            None,
            1,
            req.max_sequence_length,
            list(req.sigmas) if req.sigmas else None,
            None,
            None,
            None,
            None,
            req.images[0] if req.images else None,
            req.strength,
            req.mask,
            cancel,
            list(req.control_images) or None,
            req.control_scale,
            req.control_start,
            req.control_end,
            req.control_mask,
        )

    # -- the diffusers-like call

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
        cancel: CancelToken | None = None,
        control_image=None,
        controlnet_conditioning_scale: float | list[float] = 1.0,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        control_mask=None,
    ):
        """Generate images. Returns a list of PIL images, or with output_type="np" a float32
        array (B, H, W, 3) in [0, 1] (output_type="latent": the packed latents).

        ``latents`` are packed (B, L, 64) noise exactly as diffusers takes them. ``seed`` (one,
        or one per image) makes the noise reproducible; ``callback(step, total, latents)`` runs
        after every step; ``cancel`` (a ``CancelToken``) stops the run between steps with
        ``Cancelled``. True CFG runs only with ``true_cfg_scale > 1`` and a negative prompt
        (text or embeddings), as one batched transformer call per step. ``prompt_embeds`` /
        ``negative_prompt_embeds`` (with their masks) replace the text: encode once with
        ``encode_prompt``, sample many times.

        ``image`` (PIL image, path or array) turns on image-to-image, ``mask_image`` (white =
        repaint) inpainting, with diffusers' Img2Img / Inpaint semantics (see
        ``qwen_mlx.pipelines.img2img``): ``strength`` keeps the last ``ceil(steps * strength)``
        steps, and ``latents`` is then the noise mixed into the image. Width and height default
        to the image's size rounded down to multiples of 16 (1024 without an image).

        ``control_image`` (with a ControlNet from ``load_controlnet``; a list: several
        conditions of one Union ControlNet, residuals summed), ``controlnet_conditioning_scale``,
        ``control_guidance_start`` / ``_end`` (one value or one per image) and ``control_mask``
        (the Inpainting ControlNet's, white = repaint) have the semantics of diffusers'
        ``QwenImageControlNetPipeline`` / ``QwenImageControlNetInpaintPipeline`` (see
        ``qwen_mlx.control``). Without ``control_image`` the ControlNet is not used.
        """
        if output_type not in ("pil", "np", "latent"):
            raise RequestError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")
        if image is not None:
            image = img2img.as_pil(image)
        width, height = self.output_size(width, height, image)
        steps = self._steps(
            prompt, negative_prompt, width, height, num_inference_steps, true_cfg_scale, seed,
            latents, num_images_per_prompt, max_sequence_length, sigmas, prompt_embeds,
            prompt_embeds_mask, negative_prompt_embeds, negative_prompt_embeds_mask, image,
            strength, mask_image, cancel, control_image, controlnet_conditioning_scale,
            control_guidance_start, control_guidance_end, control_mask,
        )  # fmt: skip
        latents = run(steps, latents, callback)
        return self.finish(latents, height, width, output_type, low_memory)

    def _steps(
        self,
        prompt,
        negative_prompt,
        width,
        height,
        num_inference_steps,
        true_cfg_scale,
        seed,
        latents,
        num_images_per_prompt,
        max_sequence_length,
        sigmas,
        prompt_embeds,
        prompt_embeds_mask,
        negative_prompt_embeds,
        negative_prompt_embeds_mask,
        image,
        strength,
        mask_image,
        cancel,
        control_image=None,
        control_scale=1.0,
        control_start=0.0,
        control_end=1.0,
        control_mask=None,
    ) -> Iterator[StepEvent]:
        """Every stage up to the last denoising step, as steps: the one path of ``__call__``
        and ``generate``. Everything is checked before any model runs."""
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
            raise RequestError("mask_image needs an image to inpaint")
        controls = control_image
        if controls is not None and not isinstance(controls, (list, tuple)):
            controls = [controls]
        controls = [img2img.as_pil(im, "control image") for im in controls or ()]
        if control_mask is not None:
            control_mask = img2img.as_pil(control_mask, "control mask")
        self.check_control(controls, control_mask)
        if controls:
            control.checked(len(controls), control_scale, control_start, control_end)
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
            self.encode_prompt(texts, max_sequence_length)  # one forward for both
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
                raise RequestError(f"{uncond[0].shape[0]} negative prompts for {cond[0].shape[0]}")
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
        run_ = None
        if controls:  # the guidance window counts the steps that run (after img2img's trim)
            run_ = self.control_run(
                controls, control_mask, control_scale, control_start, control_end, height, width,
                timesteps,
            )  # fmt: skip

        yield from self._timed_denoise(
            latents, cond, uncond, sig, timesteps, [(1, h, w)], true_cfg_scale, hook, None, cancel,
            run_,
        )  # fmt: skip

    def _timed_denoise(self, latents, *args) -> Iterator[StepEvent]:
        start = time.perf_counter()
        yield from self.denoise_steps(latents, *args)
        self.timings["denoise"] = time.perf_counter() - start
        mx.clear_cache()

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
        """Every argument of ``__call__`` checked before anything runs (one-line RequestErrors),
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
                raise RequestError(f"{len(seeds)} seeds for {n * num_images_per_prompt} images")
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
                raise RequestError(f"pass {which}prompt or {which}prompt_embeds")
            return self.encode_prompt(prompt, max_sequence_length)
        if prompt is not None:
            raise RequestError(f"pass {which}prompt or {which}prompt_embeds, not both")
        embeds = mx.array(embeds, dtype=mx.float32)
        check_finite(embeds, f"{which}prompt_embeds")
        dim = int(self.transformer_config().get("joint_attention_dim", 3584))
        if embeds.ndim != 3 or embeds.shape[-1] != dim:
            raise RequestError(f"{which}prompt_embeds must be (B, T, {dim}), got {embeds.shape}")
        if mask is not None:
            mask = mx.array(mask)
            if tuple(mask.shape) != tuple(embeds.shape[:2]):
                raise RequestError(
                    f"{which}prompt_embeds_mask must be {tuple(embeds.shape[:2])}, got {mask.shape}"
                )
        return embeds, mask


def _image_key(images) -> str | None:
    """A digest of condition images (None: a text-only prompt) for the prompt cache."""
    if not images:
        return None
    import hashlib

    digest = hashlib.sha1()
    for image in images:
        digest.update(f"{image.mode}{image.size}".encode())
        digest.update(image.tobytes())
    return digest.hexdigest()
