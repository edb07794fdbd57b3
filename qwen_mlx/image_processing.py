"""Qwen2-VL image preprocessing (numpy + Pillow): what the vision tower reads.

Reproduces transformers' PIL-backend ``Qwen2VLImageProcessor`` (``Qwen2VLImageProcessorPil``), as
configured by a checkpoint's ``processor/preprocessor_config.json``:

1. convert to RGB, compositing transparency onto white;
2. ``smart_resize``: each side rounded to a multiple of ``patch_size * merge_size`` (28), the area
   kept within [min_pixels, max_pixels] at about the same aspect ratio; resized with Pillow
   (bicubic unless the config says otherwise) on the 8-bit image;
3. rescale (x * 1/255, computed in float64, stored as float32) and normalise with the CLIP
   mean/std in float32;
4. flatten into patch rows: patches grouped by 2x2 merge blocks (row-major blocks, row-major
   inside a block), each row holding (channel, temporal copy, 14, 14) values — the still image
   repeated over the 2 temporal slots.

The result is bit-identical to the reference processor's ``pixel_values`` and ``image_grid_thw``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from qwen_mlx.errors import RequestError

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 1280


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
) -> tuple[int, int]:
    """(height, width) rounded to multiples of ``factor`` with the area in [min, max] pixels."""
    if max(height, width) / min(height, width) > 200:
        raise RequestError(
            f"image aspect ratio {max(height, width) / min(height, width):.0f} is above 200"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# ----------------------------------------------------------------------------- bit depth
#
# Pillow's ``convert("RGB")`` / ``convert("L")`` clip 16-bit, 32-bit integer and float pixels to
# 0..255 instead of scaling them (a 16-bit photo comes out white, a float one black), so every
# image is brought to 8 bits by its range first: 16-bit over 0..65535, Pillow's 32-bit integer
# mode "I" over 0..65535 when its values fit (how Pillow hands over 16-bit data) else over
# 0..2**31-1, floats over 0..1.

INT16_MAX = 65535


def _float_to_uint8(arr: np.ndarray, what: str) -> np.ndarray:
    if not np.isfinite(arr).all():
        raise RequestError(f"{what} holds NaN or infinite pixel values")
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if lo < -0.5 or hi > 1.5:  # clearly not 0..1 (a 0..255 float image, say): never guess
        raise RequestError(
            f"{what} holds float pixel values from {lo:g} to {hi:g}; float images are read as "
            "0..1 (save it as an 8- or 16-bit image instead)"
        )
    return np.round(np.clip(arr.astype(np.float64), 0.0, 1.0) * 255).astype(np.uint8)


def _int_to_uint8(arr: np.ndarray, top: int) -> np.ndarray:
    return np.round(np.clip(arr.astype(np.float64) / top, 0.0, 1.0) * 255).astype(np.uint8)


def array_to_uint8(arr: np.ndarray, what: str = "image") -> np.ndarray:
    """An image array's pixels as uint8, scaled by their type's range: uint8 as is, bool to
    0/255, uint16 over 0..65535, floats over 0..1 (a little overshoot is clipped; values far
    outside, NaN or inf are a one-line RequestError). Other integer types are ambiguous as
    arrays and refused."""
    arr = np.asarray(arr)
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 2:
        return _int_to_uint8(arr, INT16_MAX)
    if arr.dtype.kind == "f":
        return _float_to_uint8(arr, what)
    raise RequestError(
        f"{what} is an array of {arr.dtype}; give uint8 (0..255), uint16 (0..65535) or float "
        "(0..1) values"
    )


def to_8bit(image: Image.Image, what: str = "image") -> Image.Image:
    """``image`` with 8-bit channels, scaled by its range (see above); 8-bit modes (L, RGB,
    RGBA, P, ...) are returned as they are. 16-bit RGB(A) PNGs need nothing: Pillow reads them
    as 8-bit RGB(A) (each value's high byte)."""
    mode = image.mode
    if mode.startswith("I;16"):
        arr = np.asarray(image).astype(np.uint16)  # I;16B arrives big-endian
        return Image.fromarray(_int_to_uint8(arr, INT16_MAX), "L")
    if mode == "I":
        arr = np.asarray(image)
        fits16 = arr.size == 0 or (arr.min() >= 0 and arr.max() <= INT16_MAX)
        return Image.fromarray(_int_to_uint8(arr, INT16_MAX if fits16 else 2**31 - 1), "L")
    if mode == "F":
        return Image.fromarray(_float_to_uint8(np.asarray(image), what), "L")
    return image


def read_image(image, what: str = "image") -> Image.Image:
    """An 8-bit PIL image (see ``to_8bit``) from a PIL image, a path, or an (H, W[, C]) array
    (see ``array_to_uint8``); an unreadable file or a bad array is a one-line RequestError naming
    ``what``. Every image qwen-mlx reads (img2img and inpaint images and masks, Edit inputs)
    goes through here."""
    if isinstance(image, Image.Image):
        return to_8bit(image, what)
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        name = os.fsdecode(image)
        try:
            with Image.open(image) as im:
                im.load()
                image = im.copy()
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise RequestError(f"cannot read {what} {name}: {' '.join(str(e).split())}") from e
        return to_8bit(image, f"{what} {name}")
    arr = np.asarray(image)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4)):
        raise RequestError(f"{what} must be a PIL image or an (H, W[, C]) array, got {arr.shape}")
    arr = array_to_uint8(arr, what)
    return Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto a white background (any bit depth: see
    ``to_8bit``)."""
    image = to_8bit(image)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


@dataclass
class ImageProcessor:
    """The processor's settings; defaults are transformers' ``Qwen2VLImageProcessor``'s (a
    checkpoint's ``processor/`` config sets its own limits: Qwen2.5-VL's allow 3136 to
    12845056 pixels)."""

    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(CLIP_STD))
    rescale_factor: float = 1 / 255
    resample: int = Image.Resampling.BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True

    @classmethod
    def from_config(cls, config: dict) -> ImageProcessor:
        """From ``preprocessor_config.json`` contents (unknown keys ignored).

        As transformers 5 reads it: ``min_pixels`` / ``max_pixels`` win over ``size``'s
        ``shortest_edge`` / ``longest_edge``.
        """
        size = config.get("size") or {}
        args = {k: config[k] for k in cls.__dataclass_fields__ if k in config}
        for key, edge, default in (
            ("min_pixels", "shortest_edge", MIN_PIXELS),
            ("max_pixels", "longest_edge", MAX_PIXELS),
        ):
            found = [config.get(key), size.get(edge), size.get(key), default]
            args[key] = int(next(v for v in found if v))
        proc = cls(**args)
        if proc.min_pixels > proc.max_pixels:
            raise ValueError(f"min_pixels {proc.min_pixels} > max_pixels {proc.max_pixels}")
        return proc

    @classmethod
    def from_folder(cls, folder: str | Path) -> ImageProcessor:
        """From a checkpoint's ``processor/`` folder (``preprocessor_config.json``)."""
        path = Path(folder) / "preprocessor_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no image processor config: {path}")
        return cls.from_config(json.loads(path.read_text()))

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) an image of this size is resized to."""
        if not self.do_resize:
            return height, width
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def pixels(self, image: Image.Image) -> np.ndarray:
        """One image as normalised float32 (C, H, W) at its target size."""
        if self.do_convert_rgb:
            image = to_rgb(image)
        h, w = self.target_size(image.height, image.width)
        if (h, w) != (image.height, image.width):
            image = image.resize((w, h), resample=self.resample)
        x = np.array(image)
        x = x[None] if x.ndim == 2 else np.moveaxis(x, -1, 0)
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            x = x.astype(np.float32) if not np.issubdtype(x.dtype, np.floating) else x
            mean = np.array(self.image_mean, dtype=x.dtype)[:, None, None]
            std = np.array(self.image_std, dtype=x.dtype)[:, None, None]
            x = (x - mean) / std
        return np.asarray(x, dtype=np.float32)

    def patchify(self, x: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        """(C, H, W) -> patch rows (H/P * W/P, C*T*P*P) and the grid (1, H/P, W/P)."""
        C, H, W = x.shape
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        gh, gw = H // p, W // p
        if H % p or W % p or gh % m or gw % m:
            raise ValueError(f"image size {H}x{W} is not a multiple of {p * m}")
        x = x.reshape(C, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
        x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))
        return x.reshape(gh * gw, C * t * p * p), (1, gh, gw)

    def __call__(self, images: Image.Image | list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        """``pixel_values`` (sum of patches, C*T*P*P) float32 and ``image_grid_thw`` (n, 3)."""
        if isinstance(images, Image.Image):
            images = [images]
        if not images:
            raise ValueError("no images to process")
        rows, grids = [], []
        for image in images:
            patches, grid = self.patchify(self.pixels(image))
            rows.append(patches)
            grids.append(grid)
        return np.concatenate(rows, axis=0), np.array(grids, dtype=np.int64)

    def merged_tokens(self, grid: tuple[int, int, int] | np.ndarray) -> int:
        """Image tokens the language model sees for one grid (patches / merge^2)."""
        t, h, w = (int(v) for v in grid)
        return t * h * w // (self.merge_size**2)
