"""The server's one seam to the pipeline: validate a request, run it step by step, cancel it.

Everything the HTTP layer needs from qwen-mlx goes through :class:`Engine`, so the APIs and the
job queue never touch MLX directly. ``Engine.check`` runs on the request's thread (no MLX: the
request checks and the memory estimate read headers only); ``Engine.run`` runs on the one worker
thread that owns MLX and the resident pipeline.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from qwen_mlx.errors import QwenMLXError

DEFAULT_STRENGTH = 0.6  # img2img / inpaint, as `generate --strength`
DEFAULT_NEGATIVE = " "  # as `generate --negative-prompt`


class Cancelled(QwenMLXError):
    """The run was cancelled (interrupt, a client that went away, shutdown); nothing is kept."""


class CancelToken:
    """Set from any thread; the run checks it after every step."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = "cancelled"

    def cancel(self, reason: str = "cancelled") -> None:
        if not self._event.is_set():
            self.reason = reason
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


@dataclass(frozen=True)
class Params:
    """What an API asks for. ``None`` = the model's default (as the CLI's)."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    cfg: float | None = None
    seed: int | None = None  # image i uses seed + i (as `generate --seed`); None = random
    n: int = 1
    images: tuple = ()  # PIL images: img2img / inpaint source, or Edit inputs
    image_names: tuple[str, ...] = ()
    mask: object | None = None  # PIL image, white = repaint
    strength: float | None = None


@dataclass
class Plan:
    """A checked request, defaults resolved: what the worker runs."""

    params: Params
    width: int
    height: int
    steps: int
    cfg: float
    seeds: list[int]
    strength: float | None
    metadata: dict = field(default_factory=dict)  # written into every PNG (plus seed, size)


@dataclass
class Step:
    image: int  # 0-based index of the image in the job
    step: int  # 1-based
    total: int
    seconds: float  # this step


@dataclass
class Result:
    seed: int
    png: bytes
    metadata: dict


class Engine:
    """A resident pipeline and what the APIs ask of it."""

    def __init__(
        self,
        pipe,
        model: str,
        *,
        lightning: int | None = None,
        loras: list | None = None,
        max_images: int = 10,
        max_steps: int | None = None,
        max_image_pixels: int = 50_000_000,
    ):
        from qwen_mlx import checks

        self.pipe = pipe
        self.model = model
        self.edit = hasattr(pipe, "edit_size")
        self.plus = bool(getattr(pipe, "plus", False))
        self.lightning = lightning
        self.loras = loras or []  # [{"name", "path", "scale", "sha256"}], applied at load
        self.max_images = max_images
        self.max_steps = max_steps or checks.MAX_STEPS
        self.max_image_pixels = max_image_pixels
        self.multiple = pipe.vae_scale * 2

    @classmethod
    def load(
        cls,
        model: str,
        *,
        precision: str | None = None,
        quantize: int | None = None,
        quantize_text_encoder: str = "auto",
        adaln_cache: bool = True,
        loras: list[tuple[str, float]] = (),
        lightning: int | None = None,
        **limits,
    ) -> Engine:
        """Open ``model`` (text-to-image or Edit, as its model_index says) with generate's load
        options; weights load on the first request (or :meth:`warm_up`)."""
        from qwen_mlx.edit_pipeline import EDIT_CLASSES, QwenImageEditPipeline
        from qwen_mlx.loading import resolve
        from qwen_mlx.pipeline import QwenImagePipeline
        from qwen_mlx.quantize import text_encoder_bits
        from qwen_mlx.sampler import LIGHTNING_SCHEDULER

        source = resolve(model)
        edit = source.index.get("_class_name") in EDIT_CLASSES
        if edit:
            pipe = QwenImageEditPipeline.from_pretrained(model, precision=precision)
        else:
            te_bits = text_encoder_bits(quantize_text_encoder, quantize)
            pipe = QwenImagePipeline.from_pretrained(
                model,
                precision=precision,
                scheduler_overrides=LIGHTNING_SCHEDULER if lightning else None,
                quantize=quantize,
                quantize_text_encoder=te_bits or "none",
                adaln_cache=adaln_cache,
            )
        pipe.check_components()
        applied = []
        for path, scale in loras:
            lora = pipe.load_lora(path, scale)
            applied.append(
                {"name": lora.name, "path": str(path), "scale": scale, "sha256": lora.digest}
            )
        return cls(pipe, model, lightning=lightning, loras=applied, **limits)

    @property
    def default_steps(self) -> int:
        """The model's: 50 (Edit-2509/2511: 40), or the Lightning preset's."""
        return self.lightning or (self.pipe.default_steps if self.edit else 50)

    @property
    def default_cfg(self) -> float:
        return 1.0 if self.lightning else 4.0

    # -- on the request's thread

    def check(self, p: Params) -> Plan:
        """Validate ``p`` with the CLI's checks and the memory guard; resolve the defaults.
        Raises a one-line ValueError / QwenMLXError (the memory guard's names what would fit)."""
        from qwen_mlx import checks, memory
        from qwen_mlx.pipeline import random_seed

        checks.check_prompts(p.prompt)
        if p.negative_prompt is not None:
            checks.check_prompts(p.negative_prompt, "negative_prompt")
        checks.check_int("the number of images (n, batch_size * n_iter)", p.n, 1, self.max_images)
        steps = self.default_steps if p.steps is None else p.steps
        cfg = self.default_cfg if p.cfg is None else p.cfg
        checks.check_steps(steps, self.max_steps, name="steps")
        cfg = checks.check_cfg(cfg)
        seed = random_seed() if p.seed is None else p.seed
        seeds = [s + i for i, s in enumerate(checks.check_seeds([seed] * p.n, p.n))]
        if p.strength is not None and not 0.0 <= p.strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {p.strength}")
        if (p.width is None) != (p.height is None):
            raise ValueError("give both width and height, or neither")
        meta = {"prompt": p.prompt, "negative_prompt": p.negative_prompt or DEFAULT_NEGATIVE}
        meta.update(steps=steps, cfg=cfg, model=self.model)
        strength = None
        if self.edit:
            if not p.images:
                raise ValueError("this is an Edit model: give an image to edit")
            most = 3 if self.plus else 1
            if len(p.images) > most:
                raise ValueError(f"this model takes at most {most} image(s), got {len(p.images)}")
            if p.mask is not None:
                raise ValueError("an Edit model takes no mask (inpainting needs Qwen-Image)")
            height, width = self.pipe.edit_size(list(p.images), p.height, p.width)
            meta.update(flavour=self.pipe.flavour, loras=self.loras)
            meta["images"] = [
                {"file": name, "width": im.width, "height": im.height}
                for name, im in zip(p.image_names, p.images, strict=True)
            ]
        else:
            if len(p.images) > 1:
                raise ValueError(f"img2img takes one image, got {len(p.images)}")
            if p.mask is not None and not p.images:
                raise ValueError("a mask needs an image to inpaint")
            source = p.images[0] if p.images else None
            if p.strength is not None and source is None:
                raise ValueError("strength needs an image (img2img)")
            width, height = self.pipe.output_size(p.width, p.height, source)
            if source is not None:
                from qwen_mlx.img2img import first_step

                strength = DEFAULT_STRENGTH if p.strength is None else p.strength
                first_step(steps, strength)  # a strength that keeps no step fails here
            meta.update(
                quantize=self.pipe.quantize,
                adaln_cache=self.pipe.adaln_cache,
                lightning=self.lightning,
                loras=self.loras,
                image=p.image_names[0] if source is not None else None,
                strength=strength,
                mask="mask.png" if p.mask is not None else None,
            )
        pipe = self.pipe
        request = memory.Request(
            width=width,
            height=height,
            cfg=cfg > 1,
            precision=pipe.precision if isinstance(pipe.precision, str) else None,
            quant_bits=None if self.edit else pipe.quantize,
            vae_tile=pipe.decode_tile_size or 128,
            adaln_cache=False if self.edit else pipe.adaln_cache,
            text_encoder_bits=None if self.edit else pipe.text_encoder_bits,
        )
        try:
            memory.check_source(pipe.source, request)
        except memory.MemoryLimitError as e:  # the CLI's advice, less its CLI-only flag
            advice = str(e).split("; or pass --ignore-memory-limit")[0]
            raise memory.MemoryLimitError(advice) from None
        return Plan(p, width, height, steps, cfg, seeds, strength, meta)

    # -- on the worker thread

    def run(
        self, plan: Plan, cancel: CancelToken, on_step: Callable[[Step], None]
    ) -> Iterator[Result]:
        """Generate every image of ``plan``, one seed after another, yielding each PNG;
        ``on_step`` after every step. A cancelled run raises :class:`Cancelled` within one
        step; a non-finite one ``NonFiniteError``."""
        import numpy as np

        from qwen_mlx import __version__
        from qwen_mlx.pipeline import to_pil

        p, pipe = plan.params, self.pipe
        for k, seed in enumerate(plan.seeds):
            last = [time.perf_counter()]

            def callback(step: int, total: int, _latents, k=k, last=last) -> None:
                now = time.perf_counter()
                on_step(Step(k, step, total, now - last[0]))
                last[0] = now
                if cancel.cancelled:
                    raise Cancelled(f"{cancel.reason} at step {step}/{total}")

            if cancel.cancelled:
                raise Cancelled(cancel.reason)
            common = dict(
                negative_prompt=p.negative_prompt or DEFAULT_NEGATIVE,
                num_inference_steps=plan.steps,
                true_cfg_scale=plan.cfg,
                seed=seed,
                height=plan.height,
                width=plan.width,
                callback=callback,
                output_type="latent",
            )
            if self.edit:
                images = list(p.images) if self.plus else p.images[0]
                latents = pipe(images, p.prompt, **common)
            else:
                latents = pipe(
                    p.prompt,
                    image=p.images[0] if p.images else None,
                    strength=plan.strength if plan.strength is not None else DEFAULT_STRENGTH,
                    mask_image=p.mask,
                    **common,
                )
            if cancel.cancelled:
                raise Cancelled(cancel.reason)
            image = to_pil(np.array(pipe.decode(latents, plan.height, plan.width)))[0]
            meta = dict(plan.metadata, seed=seed, width=plan.width, height=plan.height)
            meta.update(precision=pipe.precision_name, version=__version__)
            yield Result(seed, png_bytes(image, meta), meta)

    def warm_up(self) -> None:
        """Load every component (a 1-step run at the smallest size), so the first request
        does not pay for it."""
        plan = self.check(
            dataclasses.replace(
                Params("warm-up", steps=1, seed=0),
                width=None if self.edit else self.multiple,
                height=None if self.edit else self.multiple,
            )
        )
        if self.edit:
            return  # an Edit model needs an image: its components load on the first request
        for _ in self.run(plan, CancelToken(), lambda s: None):
            pass

    def describe(self) -> dict:
        return {
            "model": self.model,
            "kind": "edit" if self.edit else "text-to-image",
            "flavour": getattr(self.pipe, "flavour", "qwen-image") if self.edit else "qwen-image",
            "max_input_images": (3 if self.plus else 1) if self.edit else 1,
            "precision": self.pipe.precision_name,
            "lightning": self.lightning,
            "size_multiple": self.multiple,
            "default_steps": self.default_steps,
            "default_cfg": self.default_cfg,
            "max_steps": self.max_steps,
            "max_images": self.max_images,
            "aspects": aspects(),
        }


def aspects() -> dict[str, tuple[int, int]]:
    """The official presets, as `generate --aspect` knows them."""
    from qwen_mlx.cli import ASPECTS

    return ASPECTS


def png_bytes(image, metadata: dict) -> bytes:
    """The PNG as ``qwen-mlx generate`` writes it (A1111 ``parameters`` text + JSON chunk)."""
    import tempfile
    from pathlib import Path

    from qwen_mlx.cli import save_png

    with tempfile.TemporaryDirectory(prefix="qwen-mlx-png-") as tmp:
        path, _ = save_png(image, Path(tmp) / "image.png", metadata)
        return path.read_bytes()
