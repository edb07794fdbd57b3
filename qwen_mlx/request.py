"""GenerationRequest: every parameter of one generation, validated once.

The CLI, the Python API (``pipe.generate``), the memory estimate, the PNG metadata and the
server all read the same object. ``validate()`` checks what needs no model (ranges, types,
consistency); ``QwenImagePipeline.prepare`` then resolves the model's defaults (size, steps,
CFG, a random seed) and reads the input images, so a prepared request is complete.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from qwen_mlx import checks
from qwen_mlx.errors import RequestError


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt, sampled once per seed. ``None`` means "the model's default" (steps: 50,
    Edit-2509/2511 40, Lightning 4/8; CFG 4, Lightning 1; size: 1024x1024, or from the input
    image). ``images``: one image for img2img/inpaint (with ``mask``), 1-3 for Edit; paths or
    PIL images."""

    prompt: str
    negative_prompt: str | None = " "
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    cfg: float | None = None
    seeds: tuple[int, ...] = ()
    max_sequence_length: int = 512
    images: tuple = ()
    mask: object = None
    strength: float | None = None
    sigmas: tuple[float, ...] | None = None
    low_memory: bool = False
    # ControlNet (the pipeline's loaded one): control images (several = several conditions of
    # one Union ControlNet), their scale/window (one value or one per image), the Inpainting
    # ControlNet's mask, a preprocessor run on the images first ("canny")
    control_images: tuple = ()
    control_scale: float | tuple[float, ...] = 1.0
    control_start: float | tuple[float, ...] = 0.0
    control_end: float | tuple[float, ...] = 1.0
    control_mask: object = None
    control_preprocess: str | None = None
    # names of the input files for the metadata (filled from paths when not given)
    image_names: tuple[str, ...] = field(default=(), compare=False)
    mask_name: str | None = field(default=None, compare=False)
    control_image_names: tuple[str, ...] = field(default=(), compare=False)
    control_mask_name: str | None = field(default=None, compare=False)
    control_preprocessed: bool = field(default=False, compare=False)  # prepare ran it once

    def __post_init__(self) -> None:
        if isinstance(self.seeds, int):
            object.__setattr__(self, "seeds", (self.seeds,))
        if not isinstance(self.images, (tuple, list)):
            object.__setattr__(self, "images", (self.images,))
        object.__setattr__(self, "images", tuple(self.images))
        object.__setattr__(self, "seeds", tuple(self.seeds))
        if not self.image_names and self.images:
            object.__setattr__(self, "image_names", tuple(_name(im) for im in self.images))
        if self.mask_name is None and self.mask is not None:
            object.__setattr__(self, "mask_name", _name(self.mask))
        if not isinstance(self.control_images, (tuple, list)):
            object.__setattr__(self, "control_images", (self.control_images,))
        object.__setattr__(self, "control_images", tuple(self.control_images))
        for key in ("control_scale", "control_start", "control_end"):
            if isinstance(getattr(self, key), list):
                object.__setattr__(self, key, tuple(getattr(self, key)))
        if not self.control_image_names and self.control_images:
            names = tuple(_name(im) for im in self.control_images)
            object.__setattr__(self, "control_image_names", names)
        if self.control_mask_name is None and self.control_mask is not None:
            object.__setattr__(self, "control_mask_name", _name(self.control_mask))

    @property
    def cfg_on(self) -> bool:
        """True CFG runs: a scale above 1 and a negative prompt."""
        return (self.cfg or 0) > 1 and self.negative_prompt is not None

    def validate(
        self, names: Mapping[str, str] | None = None, multiple: int = 16
    ) -> GenerationRequest:
        """Every check that needs no model; one-line ``RequestError`` naming the value as
        ``names`` spells it (a caller's own names: the CLI's flags, an API's fields)."""
        names = names or {}

        def name(field: str) -> str:
            return names.get(field, field)

        checks.check_prompts(self.prompt, name("prompt"))
        if not isinstance(self.prompt, str):
            raise RequestError("prompt must be one string (sample several with seeds)")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise RequestError(f"negative_prompt must be a string, got {self.negative_prompt!r}")
        for side in ("width", "height"):
            v = getattr(self, side)
            if v is not None:
                checks.check_side(name(side), v, multiple)
        if self.steps is not None:
            checks.check_steps(self.steps, name=name("steps"))
        if self.cfg is not None:
            checks.check_cfg(self.cfg)
        checks.check_int(name("max_sequence_length"), self.max_sequence_length, 1, 1024)
        checks.check_seeds(list(self.seeds))
        if len(set(self.seeds)) != len(self.seeds):
            raise RequestError(f"each {name('seeds')} may be given once")
        if len(self.seeds) > checks.MAX_IMAGES:
            raise RequestError(f"at most {checks.MAX_IMAGES} {name('seeds')} per request")
        if self.mask is not None and not self.images:
            raise RequestError("a mask needs an image to inpaint")
        if self.strength is not None:
            if not self.images:
                raise RequestError("strength needs an input image")
            s = self.strength
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s <= 1:
                raise RequestError(f"{name('strength')} must be in [0, 1], got {s!r}")
            if math.isnan(s):
                raise RequestError(f"{name('strength')} must be in [0, 1], got nan")
        if self.sigmas is not None and self.steps is not None:
            checks.check_sigmas(list(self.sigmas), self.steps)
        self._validate_control(name)
        return self

    def _validate_control(self, name) -> None:
        from qwen_mlx import control

        if not self.control_images:
            if self.control_mask is not None:
                raise RequestError(f"{name('control_mask')} needs a control image")
            if self.control_preprocess is not None:
                raise RequestError(f"{name('control_preprocess')} needs a control image")
            return
        names = (name("control_scale"), name("control_start"), name("control_end"))
        control.checked(
            len(self.control_images), self.control_scale, self.control_start, self.control_end,
            names,
        )  # fmt: skip
        if self.control_preprocess not in (None, *control.PREPROCESSORS):
            control.preprocess(self.control_preprocess, None)  # the one-line refusal

    def replace(self, **changes) -> GenerationRequest:
        return dataclasses.replace(self, **changes)

    def metadata(self) -> dict:
        """The request's part of the PNG metadata (JSON-safe)."""
        meta = {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "steps": self.steps,
            "cfg": self.cfg,
            "width": self.width,
            "height": self.height,
            "max_sequence_length": self.max_sequence_length,
        }
        if self.images:
            meta["images"] = [
                {"file": Path(name).name, "width": im.width, "height": im.height}
                if hasattr(im, "width")
                else {"file": Path(name).name}
                for name, im in zip(self.image_names, self.images, strict=True)
            ]
        meta["image"] = self.image_names[0] if self.images else None
        meta["strength"] = self.strength
        meta["mask"] = self.mask_name
        if self.control_images:
            meta["control"] = {
                "images": [Path(n).name for n in self.control_image_names],
                "scale": self.control_scale,
                "start": self.control_start,
                "end": self.control_end,
                "mask": Path(self.control_mask_name).name if self.control_mask_name else None,
                "preprocess": self.control_preprocess,
            }
        return meta

    def to_wire(self) -> dict:
        """The request as JSON-safe data (images and masks as PNG, base64), for another
        process: ``from_wire`` rebuilds an equal request. Paths travel as paths."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _IMAGE_FIELDS:
                value = [_image_to_wire(v) for v in value]
            elif f.name in _IMAGE_FIELD:
                value = None if value is None else _image_to_wire(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_wire(cls, data: Mapping) -> GenerationRequest:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RequestError(f"unknown request fields {unknown}")
        values = {}
        for key, value in data.items():
            if key in _IMAGE_FIELDS:
                value = tuple(_image_from_wire(v) for v in value)
            elif key in _IMAGE_FIELD:
                value = None if value is None else _image_from_wire(value)
            elif isinstance(value, list):
                value = tuple(value)
            values[key] = value
        return cls(**values)


_IMAGE_FIELDS = ("images", "control_images")
_IMAGE_FIELD = ("mask", "control_mask")


def _image_to_wire(item) -> dict:
    if isinstance(item, (str, Path)) or hasattr(item, "__fspath__"):
        return {"path": str(item)}
    import base64
    import io

    buf = io.BytesIO()
    item.save(buf, format="PNG")  # lossless for every mode a request holds
    return {"png": base64.b64encode(buf.getvalue()).decode("ascii")}


def _image_from_wire(item: Mapping):
    if "path" in item:
        return item["path"]
    import base64
    import io

    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(item["png"]))) as im:
        im.load()
        return im.copy()


@dataclass
class ImageResult:
    """One finished image of ``pipe.generate``: its seed, the PIL image and its metadata (what
    the PNG carries)."""

    seed: int
    image: object
    metadata: dict


def _name(item) -> str:
    if isinstance(item, (str, Path)) or hasattr(item, "__fspath__"):
        return str(item)
    return getattr(item, "filename", "") or "<image>"
