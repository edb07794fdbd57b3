"""Reading Hugging Face checkpoints (through the runtime's ``qwen_mlx.io``) and writing MLX ones.

One shard is processed at a time, so conversion never holds more than the largest shard.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx

from qwen_mlx import io as runtime_io
from qwen_mlx.convert.errors import ConversionError
from qwen_mlx.errors import CheckpointError


@contextmanager
def conversion_errors():
    """A checkpoint problem met while converting is reported as a ConversionError."""
    try:
        yield
    except CheckpointError as e:
        raise ConversionError(str(e)) from e


def read_json(path: Path) -> dict:
    with conversion_errors():
        return runtime_io.read_json(path)


def list_shards(folder: Path) -> list[Path]:
    with conversion_errors():
        return runtime_io.list_shards(folder)


def shard_header(path: Path) -> dict[str, runtime_io.TensorInfo]:
    """The tensors of one shard from its header (checked against the file's size)."""
    with conversion_errors():
        return runtime_io.tensor_infos(path)


def iter_weights(folder: Path) -> Iterator[tuple[Path, dict[str, mx.array]]]:
    with conversion_errors():
        shards = runtime_io.list_shards(folder)
    for shard in shards:
        with conversion_errors():
            weights = runtime_io.load_shard(shard)
        yield shard, weights


def save_shard(path: Path, weights: dict[str, mx.array]) -> None:
    mx.save_safetensors(str(path), weights, metadata={"format": "mlx"})


def write_index(folder: Path, weight_map: dict[str, str], total_bytes: int) -> None:
    import json

    index = {
        "metadata": {"total_size": total_bytes},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
