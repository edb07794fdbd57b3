"""Where a model comes from: a converted folder, a diffusers folder, or a hub repo id.

* converted folder (``qwen-mlx convert`` output): components load from disk, lazily;
* diffusers-layout folder: each component is converted in memory as it loads, nothing is written;
* hub repo id (``Qwen/Qwen-Image``): the needed files are downloaded with huggingface_hub into
  its cache (resumable; ``HF_HUB_OFFLINE=1`` uses the cache only), converted once into
  ``$QWEN_MLX_CACHE`` (default ``~/.cache/qwen-mlx``) and reused from there.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from convert import ConversionError, ConvertOptions, convert_checkpoint, is_converted
from convert.convert import iter_converted_component
from convert.io import load_folder, read_json

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


class ModelNotFoundError(FileNotFoundError):
    """The model folder or repo id cannot be found (named in the message)."""


@dataclass
class ModelSource:
    """A checkpoint folder and how to read its components."""

    root: Path
    converted: bool
    name: str  # what the user asked for (folder or repo id), for metadata
    options: ConvertOptions = ConvertOptions()

    def has(self, component: str) -> bool:
        return (self.root / component).is_dir()

    def component(self, name: str) -> tuple[dict, dict[str, mx.array]]:
        """(config, MLX weights) of one component, converting in memory if needed."""
        folder = self.root / name
        if not folder.is_dir():
            raise ModelNotFoundError(f"model {self.name} has no {name}/ component ({folder})")
        if self.converted:
            return read_json(folder / "config.json"), load_folder(folder)
        config, shards = iter_converted_component(folder, self.options)
        weights: dict[str, mx.array] = {}
        for _, shard in shards:
            weights.update(shard)
        return config, weights

    def model_index(self) -> dict:
        return read_json(self.root / "model_index.json")


def cache_root() -> Path:
    return Path(os.environ.get("QWEN_MLX_CACHE", Path.home() / ".cache" / "qwen-mlx"))


def resolve(
    src: str | Path,
    dtype: str = "bfloat16",
    revision: str | None = None,
    cache_dir: str | Path | None = None,
) -> ModelSource:
    """Find ``src`` locally or on the hub and say how to read it."""
    options = ConvertOptions(dtype=dtype)
    path = Path(src).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ModelNotFoundError(f"{path} is not a Qwen-Image checkpoint (no model_index.json)")
        return ModelSource(path, is_converted(path), str(src), options)
    if not REPO_ID.match(str(src)):
        raise ModelNotFoundError(f"model not found: {src} (neither a folder nor a hub repo id)")
    root = hub_checkpoint(str(src), options, revision, cache_dir)
    return ModelSource(root, True, str(src), options)


def hub_checkpoint(
    repo_id: str,
    options: ConvertOptions,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """Download (or find in the cache) a hub checkpoint and convert it once."""
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(
            snapshot_download(
                repo_id, revision=revision, allow_patterns=HUB_PATTERNS, cache_dir=cache_dir
            )
        )
    except Exception as e:  # noqa: BLE001 - hub errors come in many types
        raise ModelNotFoundError(f"cannot get {repo_id} from the hub: {e}") from e
    dst = cache_root() / repo_id.replace("/", "--") / f"{snapshot.name}-{options.dtype}"
    if is_converted(dst):
        return dst
    try:
        convert_checkpoint(snapshot, dst, options, force=True)
    except ConversionError as e:
        raise ConversionError(f"{repo_id}: {e}") from e
    return dst


def parameter_counts(folder: Path) -> tuple[int, int, dict[str, int]]:
    """(parameters, bytes, {dtype: count}) of a component from safetensors headers only."""
    params = size = 0
    dtypes: dict[str, int] = {}
    width = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "I64": 8, "U8": 1, "I8": 1}
    for shard in sorted(folder.glob("*.safetensors")):
        with open(shard, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        for key, info in header.items():
            if key == "__metadata__":
                continue
            count = 1
            for d in info["shape"]:
                count *= d
            params += count
            size += count * width.get(info["dtype"], 4)
            dtypes[info["dtype"]] = dtypes.get(info["dtype"], 0) + count
    return params, size, dtypes
