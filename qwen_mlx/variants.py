"""Which Qwen-Image release a checkpoint is (it picks the FP16 plan's scale table).

Detected from what the checkpoint says about itself: a variant the converter recorded, a release
date in the folder or hub repo name, the pipeline class in model_index.json, the transformer config.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from qwen_mlx.errors import RequestError

# Every release with its own row in precision.SCALES.
VARIANTS = (
    "qwen-image",
    "qwen-image-edit",
    "qwen-image-edit-2509",
    "qwen-image-edit-2511",
    "qwen-image-2512",
)
DEFAULT_VARIANT = "qwen-image"

_DATE = re.compile(r"(?<!\d)(2509|2511|2512)(?!\d)")  # release dates in repo names
_CLASS_VARIANTS = {
    "QwenImageEditPlusPipeline": "qwen-image-edit-2509",
    "QwenImageEditPipeline": "qwen-image-edit",
    "QwenImageEditInpaintPipeline": "qwen-image-edit",
}


def normalize_variant(name: str) -> str:
    """A variant name in canonical form: "Qwen/Qwen-Image-Edit-2509", "edit_2511", "2512" ..."""
    key = re.sub(r"[\s_]+", "-", name.strip().lower()).split("/")[-1]
    if key in VARIANTS:
        return key
    m = _DATE.search(key)
    if m:
        return "qwen-image-2512" if m.group(1) == "2512" else f"qwen-image-edit-{m.group(1)}"
    if "edit" in key:
        return "qwen-image-edit"
    if key in ("qwen-image", "qwenimage", "base", "t2i"):
        return "qwen-image"
    raise RequestError(f"unknown model variant {name!r}; choose one of {', '.join(VARIANTS)}")


def _variant_from_name(text: str) -> str | None:
    m = _DATE.search(text)
    return normalize_variant(m.group(1)) if m else None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def detect_variant(
    path: str | Path | None = None, config: dict | None = None, override: str | None = None
) -> str:
    """The model variant of a checkpoint (a key of ``SCALES``).

    In order: ``override``; a variant recorded by the converter in ``config``; a release date
    (2509/2511/2512) in the checkpoint's folder or hub repo name (or ``_name_or_path``); the
    pipeline class in model_index.json (``QwenImageEditPlusPipeline`` = Edit-2509/2511,
    ``QwenImageEditPipeline`` = Edit); a transformer with ``zero_cond_t`` (2511); else qwen-image.
    ``path`` may be the checkpoint root or its transformer/ folder.
    """
    if override:
        return normalize_variant(override)
    config = dict(config or {})
    recorded = config.get("qwen_mlx", {}).get("variant")
    if recorded:
        return normalize_variant(recorded)
    roots: list[Path] = []
    if path is not None:
        p = Path(path).expanduser()
        roots = [p, p.parent] if not (p / "model_index.json").is_file() else [p]
    index: dict = {}
    for root in roots:
        if (root / "model_index.json").is_file():
            index = _read_json(root / "model_index.json")
            break
    # Folder names: the checkpoint's own, and the hub's models--Org--Name for snapshots.
    names = [str(config.get("_name_or_path", "")), str(index.get("_name_or_path", ""))]
    for root in roots:
        parts = root.resolve().parts if root.exists() else root.parts
        names += [part for part in parts[-4:] if "qwen" in part.lower() or part == root.name]
    for text in names:
        found = _variant_from_name(text)
        if found:
            return found
    if config.get("zero_cond_t"):  # before the class: 2511 is a QwenImageEditPlusPipeline too
        return "qwen-image-edit-2511"
    cls = index.get("_class_name", "")
    if cls in _CLASS_VARIANTS:
        return _CLASS_VARIANTS[cls]
    if any("edit" in text.lower() for text in names):
        return "qwen-image-edit"
    return DEFAULT_VARIANT
