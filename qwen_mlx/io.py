"""Reading checkpoints: JSON configs and safetensors shards, one shard at a time.

Shards are read with ``mx.load`` (lazy, and bf16-native: numpy has no bf16). This module is the
runtime's: the converter builds on it, never the reverse.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx

from qwen_mlx.errors import CheckpointError

INDEX_GLOB = "*.safetensors.index.json"
# Components whose weights the converter rewrites (the others, e.g. tokenizer, are copied).
CONVERTED_COMPONENTS = ("transformer", "vae", "text_encoder")


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; a missing file or bad JSON names the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"missing file: {path}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def is_converted(path: Path) -> bool:
    """True when ``path`` is a qwen-mlx converted checkpoint (or component folder): its
    model_index.json or config.json carries a ``qwen_mlx`` section."""
    path = Path(path)
    for meta in (path / "model_index.json", path / "config.json"):
        if meta.is_file():
            try:
                return "qwen_mlx" in json.loads(meta.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
                return False
    return False


def list_shards(folder: Path) -> list[Path]:
    """The safetensors files of one component, in order, checked against the index if any."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"missing component folder: {folder}")
    indexes = sorted(folder.glob(INDEX_GLOB))
    if indexes:
        weight_map = read_json(indexes[0]).get("weight_map", {})
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(
                f"missing shard(s) in {folder}: {', '.join(missing)} (listed in {indexes[0].name})"
            )
        return [folder / n for n in names]
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"no .safetensors weights in {folder}")
    return shards


def load_shard(path: Path) -> dict[str, mx.array]:
    """Load one safetensors file, turning any reader failure into a clear error."""
    try:
        weights = mx.load(str(path))
    except Exception as e:  # noqa: BLE001 - MLX raises several types for corrupt files
        raise CheckpointError(f"cannot read {path}: corrupt or truncated shard ({e})") from e
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path} is not a safetensors weight file")
    return weights


def iter_weights(folder: Path) -> Iterator[tuple[Path, dict[str, mx.array]]]:
    """(shard path, its tensors) for each shard of a component folder."""
    for shard in list_shards(folder):
        yield shard, load_shard(shard)


def load_folder(folder: Path) -> dict[str, mx.array]:
    """Every tensor of a component folder (lazily: nothing is read until it is used)."""
    weights: dict[str, mx.array] = {}
    for _, shard in iter_weights(folder):
        weights.update(shard)
    return weights


def safetensors_header(path: Path) -> dict:
    """A safetensors file's JSON header (names, dtypes, shapes) without reading any tensor."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= min(path.stat().st_size - 8, 1 << 28):
                raise CheckpointError(f"cannot read {path}: corrupt header length {n}")
            header = json.loads(f.read(n))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"cannot read {path}: header is not a JSON object")
    header.pop("__metadata__", None)
    return header


DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "I64": 8, "U8": 1,
               "I8": 1, "BOOL": 1}  # fmt: skip


def parameter_counts(folder: Path) -> tuple[int, int, dict[str, int]]:
    """(parameters, bytes, {dtype: parameters}) of a component, from safetensors headers only.

    Quantized linears (a packed ``U32`` weight with sibling ``.scales``) count the parameters
    they stand for: 32 / bits per packed element, bits from the component's config; their scales
    and biases count as bytes only.
    """
    folder = Path(folder)
    config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    bits = int((config.get("quantization") or {}).get("bits", 0) or 0)
    header: dict = {}
    for shard in list_shards(folder):
        header.update(safetensors_header(shard))
    params = size = 0
    dtypes: dict[str, int] = {}
    for key, info in header.items():
        count = 1
        for d in info["shape"]:
            count *= d
        size += count * DTYPE_BYTES.get(info["dtype"], 4)
        stem = key.rsplit(".", 1)[0]
        quantized = bits and f"{stem}.scales" in header
        if quantized and key.endswith((".scales", ".biases")):
            continue
        if quantized and info["dtype"] == "U32":
            count = count * 32 // bits
            kind = f"Q{bits}"
        else:
            kind = info["dtype"]
        params += count
        dtypes[kind] = dtypes.get(kind, 0) + count
    return params, size, dtypes
