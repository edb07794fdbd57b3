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
from pathlib import Path

import mlx.core as mx
import numpy as np

from qwen_mlx.errors import QwenMLXError, RequestError

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
            raise RequestError(f"{name} must be in [0, 1], got {value}")
    if start >= end:
        raise RequestError(
            f"control_guidance_start ({start}) must be below control_guidance_end ({end})"
        )


def check_scale(scale: float) -> None:
    if not np.isfinite(scale):
        raise RequestError(f"controlnet_conditioning_scale must be a finite number, got {scale}")


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
        raise RequestError("the control mask has no white (repaint) area")
    x = pixels(image, width, height)
    masked = mx.where(mx.array(m > 0.5)[None, :, :, None], -1.0, x)
    z = encode(masked).astype(mx.float32)
    keep_area = 1.0 - m[::scale, ::scale]  # nearest-neighbour down-sampling
    keep_area = mx.array(keep_area)[None, :, :, None]
    if keep_area.shape[1:3] != z.shape[1:3]:
        raise RequestError(f"mask at latent size {keep_area.shape[1:3]} != latents {z.shape[1:3]}")
    return pack(mx.concatenate([z, keep_area], axis=-1))


# ----------------------------------------------------------------------------- preprocessors


def canny(image, low: int = CANNY_LOW, high: int = CANNY_HIGH):
    """Canny edges (white on black, RGB) with OpenCV's ``cv2.Canny`` on the grayscale image."""
    from PIL import Image

    cv2 = _opencv()
    if not (0 <= low <= high):
        raise RequestError(f"canny thresholds must satisfy 0 <= low <= high, got {low}, {high}")
    gray = np.asarray(image.convert("L"))
    edges = cv2.Canny(gray, int(low), int(high))
    return Image.fromarray(edges).convert("RGB")


def preprocess(name: str, image, **kw):
    if name not in PREPROCESSORS:
        raise RequestError(
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


# ----------------------------------------------------------------------------- loading

HUB_PATTERNS = ["config.json", "*.safetensors", "*.safetensors.index.json"]


def resolve(src, dtype: str = "bfloat16", revision: str | None = None) -> Path:
    """A ControlNet folder: local (converted or diffusers' layout), or a hub id downloaded
    with huggingface_hub and converted once into ``$QWEN_MLX_CACHE/controlnet``."""
    from qwen_mlx.errors import ModelNotFoundError
    from qwen_mlx.loading import cache_root, is_hub_id

    if isinstance(src, (list, tuple)):
        raise RequestError(MULTI_CONTROLNET_ERROR)
    path = Path(src).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is not a ControlNet folder (no config.json)")
        return path
    if not is_hub_id(src):
        raise ModelNotFoundError(f"no such ControlNet folder: {src}")
    from huggingface_hub import snapshot_download

    from qwen_mlx.convert import ConversionError, ConvertOptions, convert_checkpoint

    try:
        snapshot = Path(snapshot_download(str(src), revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # noqa: BLE001 - hub errors come in many types
        raise ModelNotFoundError(
            f"{src}: no such folder, and cannot get it from the hub: {e}"
        ) from e
    dst = cache_root() / "controlnet" / str(src).replace("/", "--") / f"{snapshot.name}-{dtype}"
    from qwen_mlx.io import is_converted

    if not is_converted(dst):
        try:
            convert_checkpoint(snapshot, dst, ConvertOptions(dtype=dtype), force=True)
        except ConversionError as e:
            raise ConversionError(f"{src}: {e}") from e
    return dst


def read_config(folder: Path, transformer_config: dict, where: str) -> dict:
    """The ControlNet's config.json, checked (class, widths against the transformer, weights'
    shapes from the headers): every problem is a one-line error before anything loads."""
    from qwen_mlx.errors import CheckpointError
    from qwen_mlx.io import folder_tensors, read_json
    from qwen_mlx.models.controlnet import check_compatible, is_controlnet_config
    from qwen_mlx.shapes import check_component

    config = read_json(folder / "config.json")
    if not is_controlnet_config(config):
        name = config.get("_class_name", "no _class_name")
        raise CheckpointError(f"{where}: not a QwenImageControlNetModel ({name})")
    check_compatible(config, transformer_config, where)
    if "qwen_mlx" in config:  # converted: the shapes are in MLX naming already
        shapes = {k: tuple(v.shape) for k, v in folder_tensors(folder).items()}
        check_component("controlnet", config, shapes, f"{where}/config.json")
    else:  # diffusers' layout: the converter's own check, on lazy stand-ins
        from qwen_mlx.convert import ConvertOptions
        from qwen_mlx.convert.convert import check_component_folder

        check_component_folder(folder, ConvertOptions(dtype="float32"))
    return config


def plan_for(transformer_plan, num_layers: int, eps: float = 1e-6):
    """The ControlNet's precision plan: the transformer's, by name, for its own depth."""
    from qwen_mlx.precision import PrecisionPlan, make_plan

    try:
        return make_plan(transformer_plan.name, transformer_plan.variant, num_layers, eps)
    except ValueError:  # a custom plan: its outer dtype throughout
        return PrecisionPlan.uniform(transformer_plan.outer, num_layers, eps)


# ----------------------------------------------------------------------------- per run


def per_image(n: int, value, name: str) -> list[float]:
    """A scalar for every one of ``n`` control images, or a list of exactly ``n``."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise RequestError(f"{len(values)} {name} values for {n} control images")
    return [float(v) for v in values]


def checked(
    n: int,
    scale,
    start,
    end,
    names=("controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end"),
):
    """(scales, starts, ends) for ``n`` control images, each checked (one-line errors)."""
    scales = per_image(n, scale, names[0])
    starts = per_image(n, start, names[1])
    ends = per_image(n, end, names[2])
    for s in scales:
        check_scale(s)
    for a, b in zip(starts, ends, strict=True):
        check_window(a, b)
    return scales, starts, ends


class ControlRun:
    """One run's ControlNet state: the model, each condition (packed latents, scale, which
    steps run it), the sigmas and (with the adaLN cache) its per-step modulation.

    ``residuals`` is what a denoising step calls: the ControlNet on the noisy latents and the
    positive prompt, once per condition whose window holds the step, summed (diffusers'
    single-ControlNet ``QwenImageMultiControlNetModel``), repeated over the CFG halves; None
    when no condition runs at this step.
    """

    def __init__(
        self,
        model,
        conditions: list[mx.array],
        scales: list[float],
        starts: list[float],
        ends: list[float],
        timesteps: mx.array,
        table=None,
    ):
        self.model = model
        n = len(timesteps)
        self.conditions = [
            (cond, float(scale), keep(n, a, b))
            for cond, scale, a, b in zip(conditions, scales, starts, ends, strict=True)
        ]
        self.timesteps = timesteps  # the sigmas the models receive, one per step
        self.table = table

    def residuals(
        self,
        i: int,
        latents: mx.array,
        embeds: mx.array,
        mask: mx.array | None,
        img_shapes,
        repeat: int = 1,
    ) -> list[mx.array] | None:
        B = latents.shape[0]
        mod = self.table[i].blocks if self.table is not None else None
        t = self.timesteps[i : i + 1]
        total = None
        for cond, scale, kept in self.conditions:
            if scale * kept[i] == 0.0:
                continue  # diffusers runs it with scale 0: zero residuals, the same sum
            cond = mx.broadcast_to(cond, (B, *cond.shape[1:]))
            out = self.model(
                latents, cond, scale * kept[i], embeds, mask, t, [list(img_shapes)] * B, mod
            )
            total = out if total is None else [a + b for a, b in zip(total, out, strict=True)]
        if total is None:
            return None
        return [mx.concatenate([r] * repeat) for r in total] if repeat > 1 else total

    def kwargs(self, den):
        """The ``Denoiser.transformer_kwargs`` hook: step i's residuals from the noisy latents
        (the first ``den.batch`` rows of the model input) and the positive prompt."""

        def extra(i: int, x: mx.array) -> dict:
            embeds, mask = den.prompt
            # both CFG branches get the same residuals; one branch when processes split CFG
            repeat = 2 if den.cfg and den.cfg_split is None else 1
            res = self.residuals(i, x[: den.batch], embeds, mask, den.img_shapes, repeat)
            return {} if res is None else {"controlnet_block_samples": res}

        return extra
