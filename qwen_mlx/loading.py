"""Where a model comes from, written once: a converted folder, a diffusers folder, a hub repo id.

* converted folder (``qwen-mlx convert`` output): components load from disk, lazily;
* diffusers-layout folder: each component is converted in memory as it loads, nothing is written;
* hub repo id (``Qwen/Qwen-Image``): the needed files are downloaded with huggingface_hub into
  its cache (resumable; ``HF_HUB_OFFLINE=1`` uses the cache only; a hub that does not answer
  fails in seconds, see ``qwen_mlx.hub``), converted once into ``$QWEN_MLX_CACHE`` (default
  ``~/.cache/qwen-mlx``, see ``qwen_mlx.cache``) and reused from there.

``load_component`` is the one place that decides between reading a converted component and
converting one in memory; every model's ``from_pretrained`` and the pipeline go through it.
This is the only runtime module that reaches for the converter (lazily, for in-memory loads).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from qwen_mlx.cache import cache_folder, cache_root  # noqa: F401 - cache_root re-exported
from qwen_mlx.dtypes import DTYPE_NAMES, cast_floats, dtype_of
from qwen_mlx.errors import CheckpointError, ModelNotFoundError
from qwen_mlx.io import CONVERTED_COMPONENTS, is_converted, load_folder, read_json

HUB_PATTERNS = [
    "model_index.json",
    "scheduler/*",
    "tokenizer/*",
    "processor/*",
    "text_encoder/*",
    "transformer/*",
    "vae/*",
]
REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def load_component(
    folder: str | Path,
    dtype: str | mx.Dtype | None = None,
    convert_dtype: str = "float32",
    precision: str | None = None,
) -> tuple[dict, dict[str, mx.array]]:
    """(config, MLX weights) of one component folder.

    A converted folder is read as it is (lazily); an unconverted diffusers one is converted in
    memory in ``dtype`` (or ``convert_dtype`` when no dtype is asked for; ``precision`` for the
    transformer's folding). ``dtype`` casts the floating weights (quantized ones pass through).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelNotFoundError(f"no such component folder: {folder}")
    if is_converted(folder):
        config, weights = read_json(folder / "config.json"), load_folder(folder)
    else:
        from qwen_mlx.convert import ConvertOptions, iter_converted_component

        name = DTYPE_NAMES[dtype_of(dtype)] if dtype is not None else convert_dtype
        options = ConvertOptions(dtype=name, precision=precision)
        config, shards = iter_converted_component(folder, options)
        weights = {k: v for _, shard in shards for k, v in shard.items()}
    if dtype is not None:
        weights = cast_floats(weights, dtype)
    return config, weights


def load_weights(
    model: nn.Module,
    weights: dict[str, mx.array],
    where: str,
    dtype: str | mx.Dtype | None = None,
) -> None:
    """Load ``weights`` (cast to ``dtype`` if given, floats only) into ``model``, strictly: a
    missing, extra or mis-shaped tensor is a CheckpointError naming ``where``."""
    if dtype is not None:
        weights = cast_floats(weights, dtype)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise CheckpointError(f"{where}: weights do not match the config: {e}") from e


@dataclass
class ModelSource:
    """A checkpoint folder and how to read its components."""

    root: Path
    converted: bool
    name: str  # what the user asked for (folder or repo id), for metadata
    dtype: str = "bfloat16"  # conversion dtype for an unconverted checkpoint
    index: dict = field(default_factory=dict)  # model_index.json

    def has(self, component: str) -> bool:
        return (self.root / component).is_dir()

    def folder(self, component: str) -> Path:
        folder = self.root / component
        if not folder.is_dir():
            raise ModelNotFoundError(f"model {self.name} has no {component}/ component ({folder})")
        if self.converted and component in CONVERTED_COMPONENTS and not is_converted(folder):
            raise CheckpointError(
                f"{folder}: not a qwen-mlx converted component (its config.json has no qwen_mlx "
                f"section) although {self.root} is a converted checkpoint; convert it again"
            )
        return folder

    def component(self, name: str, dtype: str | None = None) -> tuple[dict, dict[str, mx.array]]:
        """(config, MLX weights) of one component, converting in memory if needed."""
        return load_component(self.folder(name), dtype=dtype, convert_dtype=self.dtype)

    def config(self, name: str) -> dict:
        """A component's config.json, without touching its weights."""
        return read_json(self.folder(name) / "config.json")


def is_hub_id(src: str | Path) -> bool:
    """Shaped like a hub repo id (``org/name``), not like a path (``./x``, ``/x``, ``~/x``)."""
    text = str(src)
    return bool(REPO_ID.match(text)) and not text.startswith((".", "~", "/"))


def resolve(
    src: str | Path,
    dtype: str = "bfloat16",
    revision: str | None = None,
    cache_dir: str | Path | None = None,
) -> ModelSource:
    """Find ``src`` locally or on the hub and say how to read it."""
    path = Path(src).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ModelNotFoundError(f"{path} is not a Qwen-Image checkpoint (no model_index.json)")
        index = read_json(path / "model_index.json")
        return ModelSource(path, "qwen_mlx" in index, str(src), dtype, index)
    if not is_hub_id(src):
        raise ModelNotFoundError(f"no such folder: {src}")
    root = hub_checkpoint(str(src), dtype, revision, cache_dir)
    return ModelSource(root, True, str(src), dtype, read_json(root / "model_index.json"))


def hub_checkpoint(
    repo_id: str,
    dtype: str = "bfloat16",
    revision: str | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """Download (or find in the cache) a hub checkpoint and convert it once."""
    from huggingface_hub import snapshot_download

    from qwen_mlx import hub
    from qwen_mlx.convert import ConversionError, ConvertOptions, convert_checkpoint

    def download(local_only: bool) -> Path:
        extra = {"local_files_only": True} if local_only else {}
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=HUB_PATTERNS,
                cache_dir=cache_dir,
                **extra,
            )
        )

    why = None if hub.offline() else hub.unreachable(repo_id)
    try:
        snapshot = download(local_only=why is not None or hub.offline())
    except Exception as e:  # noqa: BLE001 - hub errors come in many types
        if why is not None:
            raise ModelNotFoundError(hub.unreachable_message(repo_id, why)) from None
        if hub.offline():
            raise ModelNotFoundError(hub.offline_message(repo_id)) from None
        raise ModelNotFoundError(
            f"{repo_id}: no such folder, and cannot get it from the hub: {e}"
        ) from e
    dst = cache_folder(repo_id.replace("/", "--")) / f"{snapshot.name}-{dtype}"
    if is_converted(dst):
        return dst
    try:
        convert_checkpoint(snapshot, dst, ConvertOptions(dtype=dtype), force=True)
    except ConversionError as e:
        raise ConversionError(f"{repo_id}: {e}") from e
    return dst
