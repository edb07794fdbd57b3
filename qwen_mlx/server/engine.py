"""The server's one seam to the pipeline: check a request, run it step by step, cancel it.

Everything the HTTP layer needs from qwen-mlx goes through :class:`Engine`, built on the core
API (``GenerationRequest``, ``pipe.prepare``, ``pipe.check_memory``, ``pipe.generate`` with a
``CancelToken``). ``Engine.check`` runs on the request's thread: ``prepare`` and the memory
estimate read configs and safetensors headers and evaluate nothing. ``Engine.run`` runs on the
one worker thread that built the pipeline and owns MLX (MLX streams are per thread).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from qwen_mlx.errors import Cancelled
from qwen_mlx.pipelines.denoise import CancelToken as _CoreToken

__all__ = ["Cancelled", "CancelToken", "Engine", "Params", "Plan", "Result", "Step"]
DEFAULT_NEGATIVE = " "  # as `generate --negative-prompt`
MAX_EDIT_IMAGES = 3  # Edit-2509/2511 (Qwen-Image-Edit: 1)


class CancelToken(_CoreToken):
    """The core's token (checked before every step), plus why it was cancelled."""

    def __init__(self) -> None:
        super().__init__()
        self.reason = "cancelled"

    def cancel(self, reason: str = "cancelled") -> None:
        if not self.cancelled:
            self.reason = reason
        super().cancel()


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
    """A checked request (``GenerationRequest``, prepared: defaults resolved)."""

    request: object
    model: str

    @property
    def width(self) -> int:
        return self.request.width

    @property
    def height(self) -> int:
        return self.request.height

    @property
    def steps(self) -> int:
        return self.request.steps

    @property
    def cfg(self) -> float:
        return self.request.cfg

    @property
    def seeds(self) -> list[int]:
        return list(self.request.seeds)

    @property
    def strength(self) -> float | None:
        return self.request.strength

    @property
    def negative_prompt(self) -> str | None:
        return self.request.negative_prompt


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
        max_images: int = 10,
        max_steps: int | None = None,
        max_image_pixels: int = 50_000_000,
    ):
        from qwen_mlx import checks

        self.pipe = pipe
        self.model = model
        self.edit = hasattr(pipe, "edit_size")
        self.plus = bool(getattr(pipe, "plus", False))
        self.max_images = max_images
        self.max_steps = max_steps or checks.MAX_STEPS
        self.max_image_pixels = max_image_pixels
        self.multiple = pipe.vae_scale * 2  # VAE scale x 2x2 patches
        world = getattr(pipe, "world", None)
        self.world = world if world is not None and world.distributed else None
        pipe.serving = True  # under mlx.launch, --parallel auto takes every request

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
        parallel: str | None = None,
        **limits,
    ) -> Engine:
        """Open ``model`` (text-to-image or Edit, as its model_index says) with generate's load
        options; weights load on the first request (or :meth:`warm_up`). ``parallel``: under
        ``mlx.launch``, how the processes split each job (rank 0 serves, see :meth:`follow`)."""
        from qwen_mlx.loading import resolve
        from qwen_mlx.pipelines.edit import EDIT_CLASSES, QwenImageEditPipeline
        from qwen_mlx.pipelines.txt2img import QwenImagePipeline
        from qwen_mlx.quantize import check_bits, text_encoder_bits

        if quantize is not None:
            check_bits(quantize)
        edit = resolve(model).index.get("_class_name") in EDIT_CLASSES
        pipe_cls = QwenImageEditPipeline if edit else QwenImagePipeline
        pipe = pipe_cls.from_pretrained(
            model,
            precision=precision,
            quantize=quantize,
            quantize_text_encoder=text_encoder_bits(quantize_text_encoder, quantize) or "none",
            adaln_cache=adaln_cache,
            lightning=lightning,
            parallel=parallel,
        )
        pipe.check_components()
        for path, scale in loras:
            pipe.load_lora(path, scale)  # checked against the transformer's shapes here
        return cls(pipe, model, **limits)

    @property
    def default_steps(self) -> int:
        """The model's: 50 (Edit-2509/2511: 40), or the Lightning preset's."""
        return self.pipe.default_steps

    @property
    def default_cfg(self) -> float:
        return self.pipe.default_cfg

    # -- on the request's thread

    def check(self, p: Params) -> Plan:
        """``p`` as a ``GenerationRequest``, prepared by the pipeline (the CLI's checks, the
        model's defaults) and checked against the memory guard. Raises a one-line
        ``RequestError`` / ``QwenMLXError`` / ``MemoryLimitError`` (with what would fit)."""
        from qwen_mlx import checks, memory
        from qwen_mlx.errors import RequestError
        from qwen_mlx.pipelines.txt2img import random_seed
        from qwen_mlx.request import GenerationRequest

        checks.check_int("the number of images (n, batch_size * n_iter)", p.n, 1, self.max_images)
        if p.steps is not None:
            checks.check_steps(p.steps, self.max_steps, name="steps")
        if (p.width is None) != (p.height is None):
            raise RequestError("give both width and height, or neither")
        if self.edit and len(p.images) > (MAX_EDIT_IMAGES if self.plus else 1):
            most = MAX_EDIT_IMAGES if self.plus else 1
            raise RequestError(f"this model takes at most {most} image(s), got {len(p.images)}")
        if self.edit and not p.images:
            raise RequestError("this is an Edit model: give an image to edit")
        seed = random_seed() if p.seed is None else p.seed
        base = checks.check_seeds([seed], p.n)[0]
        request = GenerationRequest(
            prompt=p.prompt,
            negative_prompt=DEFAULT_NEGATIVE if p.negative_prompt is None else p.negative_prompt,
            width=p.width,
            height=p.height,
            steps=p.steps,
            cfg=p.cfg,
            seeds=tuple(base + i for i in range(p.n)),
            images=tuple(p.images),
            image_names=tuple(p.image_names),
            mask=p.mask,
            mask_name="mask.png" if p.mask is not None else None,
            strength=p.strength,
        )
        request = self.pipe.prepare(request)
        if request.steps > self.max_steps:
            raise RequestError(
                f"the model's {request.steps} steps are above this server's limit "
                f"({self.max_steps}); ask for fewer steps"
            )
        try:
            if self.world is None:
                self.pipe.check_memory(request)
            else:  # rank 0's view of its share now; every process checks its own in the job
                from qwen_mlx.distributed import job_mode

                mode = job_mode(self.pipe, request, self.world.size)
                self.pipe.check_memory(request, split=mode, processes=self.world.size)
        except memory.MemoryLimitError as e:  # the advice, less the CLI-only flag
            check = getattr(e, "check", None)
            advice = check.summary() if check is not None else str(e)
            raise memory.MemoryLimitError(advice, check) from None
        return Plan(request, self.model)

    # -- on the worker thread

    def run(
        self, plan: Plan, cancel: CancelToken, on_step: Callable[[Step], None]
    ) -> Iterator[Result]:
        """Generate every image of ``plan`` (``pipe.generate``: one seed after another),
        yielding each PNG; ``on_step`` after every step. A cancelled run raises
        :class:`Cancelled` within one step; a non-finite one ``NonFiniteError``."""
        from qwen_mlx.png import png_bytes
        from qwen_mlx.request import ImageResult

        seeds = plan.seeds
        step, total = 0, plan.steps
        shared = cancel
        if self.world is not None:  # the followers run the same job in step (``follow``)
            from qwen_mlx.distributed import SharedCancel

            try:
                message = {"kind": "job", "request": plan.request.to_wire()}
            except Exception as e:  # nothing sent yet: the group is still in step
                e.in_step = True
                raise
            self.world.broadcast_json(message, "sending the job to the other processes")
            shared = SharedCancel(self.world, cancel)
        try:
            for event in self.pipe.generate(plan.request, cancel=shared):
                if isinstance(event, ImageResult):
                    yield Result(event.seed, png_bytes(event.image, event.metadata), event.metadata)
                else:
                    step, total = event.index, event.total
                    on_step(Step(seeds.index(event.seed), step, total, event.seconds))
        except Cancelled as e:
            error = Cancelled(f"{cancel.reason} at step {step}/{total}")
            error.in_step = getattr(e, "in_step", False)
            raise error from None

    # -- several processes (rank 0 serves; the others follow)

    IDLE_PING = 5.0  # seconds between rank 0's pings while idle: a lost process shows

    @property
    def idle_seconds(self) -> float | None:
        """How often the worker calls :meth:`idle` while no job waits (None: never)."""
        return self.IDLE_PING if self.world is not None else None

    def idle(self) -> None:
        """Rank 0, idle: one small collective, so a process that died ends the server now
        rather than at the next request."""
        if self.world is not None:
            self.world.broadcast_json({"kind": "ping"}, "checking the other processes")

    def close(self) -> None:
        """Rank 0, stopping: the followers end too (exit 0)."""
        if self.world is not None:
            self.world.broadcast_json({"kind": "stop"}, "stopping the other processes")

    def follow(self) -> None:
        """A follower's loop (rank > 0 under ``mlx.launch``): wait for rank 0's next message
        (for ever: a server may idle for hours; a lost rank 0 ends the wait at once), run each
        job in step with it (images stay on rank 0), return when rank 0 stops. An error every
        rank raised together (a refused request, a cancel) ends the job, not the loop."""
        import math

        import mlx.core as mx

        from qwen_mlx.distributed import SharedCancel, in_step
        from qwen_mlx.request import GenerationRequest

        world = self.world
        while True:
            message = world.broadcast_json(None, "waiting for the next job", seconds=math.inf)
            if message["kind"] == "stop":
                return
            if message["kind"] != "job":
                continue
            try:
                try:
                    request = GenerationRequest.from_wire(message["request"])
                except Exception as e:  # noqa: BLE001 - reported where rank 0 checks the request
                    with world.agree("checking the request"):  # run_generate's first checkpoint
                        raise e from None
                for _ in self.pipe.generate(request, cancel=SharedCancel(world)):
                    pass
            except Exception as e:  # noqa: BLE001 - rank 0 answers the client
                if not in_step(e):
                    raise
            finally:
                mx.clear_cache()  # as rank 0's worker does after each job

    def warm_up(self) -> None:
        """Load every weight (a 1-step run at the smallest size; an Edit model edits a small
        grey image), so the first request does not pay for it."""
        from PIL import Image

        size = self.multiple
        images = (Image.new("RGB", (size, size), (128, 128, 128)),) if self.edit else ()
        names = ("warm-up.png",) if images else ()
        params = Params(
            "warm-up", width=size, height=size, steps=1, seed=0, images=images, image_names=names
        )
        plan = self.check(params)
        for _ in self.run(plan, CancelToken(), lambda s: None):
            pass

    def describe(self) -> dict:
        return {
            "model": self.model,
            "kind": "edit" if self.edit else "text-to-image",
            "flavour": self.pipe.flavour if self.edit else "qwen-image",
            "max_input_images": (MAX_EDIT_IMAGES if self.plus else 1) if self.edit else 1,
            "precision": self.pipe.precision_name,
            "processes": self.world.size if self.world is not None else 1,
            "parallel": self.pipe.parallel if self.world is not None else None,
            "lightning": self.pipe.lightning,
            "size_multiple": self.multiple,
            "default_steps": self.default_steps,
            "default_cfg": self.default_cfg,
            "max_steps": self.max_steps,
            "max_images": self.max_images,
            "aspects": aspects(),
        }


def aspects() -> dict[str, tuple[int, int]]:
    """The official presets, as `generate --aspect` knows them."""
    from qwen_mlx.cli.common import ASPECTS

    return ASPECTS
