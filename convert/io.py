"""Reading Hugging Face safetensors folders and writing MLX ones.

Shards are read with ``mx.load``, which understands bf16 natively (numpy has no bf16), and one
shard is processed at a time so conversion never holds more than the largest shard.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx

from .errors import ConversionError


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ConversionError(f"missing file: {path}") from e
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from e


def list_shards(folder: Path) -> list[Path]:
    """The safetensors files of one component, in order, checked against the index if any."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConversionError(f"missing component folder: {folder}")
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = read_json(indexes[0]).get("weight_map", {})
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ConversionError(
                f"missing shard(s) in {folder}: {', '.join(missing)} (listed in {indexes[0].name})"
            )
        return [folder / n for n in names]
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise ConversionError(f"no .safetensors weights in {folder}")
    return shards


def load_shard(path: Path) -> dict[str, mx.array]:
    """Load one safetensors file, turning any reader failure into a clear error."""
    try:
        weights = mx.load(str(path))
    except Exception as e:  # noqa: BLE001 - MLX raises several types for corrupt files
        raise ConversionError(f"cannot read {path}: corrupt or truncated shard ({e})") from e
    if not isinstance(weights, dict):
        raise ConversionError(f"{path} is not a safetensors weight file")
    return weights


def iter_weights(folder: Path) -> Iterator[tuple[Path, dict[str, mx.array]]]:
    for shard in list_shards(folder):
        yield shard, load_shard(shard)


def load_folder(folder: Path) -> dict[str, mx.array]:
    """Every tensor of an (already converted) MLX component folder."""
    weights: dict[str, mx.array] = {}
    for _, shard in iter_weights(folder):
        weights.update(shard)
    return weights


def save_shard(path: Path, weights: dict[str, mx.array]) -> None:
    mx.save_safetensors(str(path), weights, metadata={"format": "mlx"})


def write_index(folder: Path, weight_map: dict[str, str], total_bytes: int) -> None:
    index = {
        "metadata": {"total_size": total_bytes},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
