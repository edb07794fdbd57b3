"""Reading checkpoints: JSON configs and safetensors shards, one shard at a time.

Shards are read with ``mx.load`` (lazy, and bf16-native: numpy has no bf16). This module is the
runtime's: the converter builds on it, never the reverse.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
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
    except OSError as e:  # a folder, a permission
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e
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
                data = json.loads(meta.read_text())
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                return False
            return isinstance(data, dict) and "qwen_mlx" in data
    return False


def _shard_name(folder: Path, index: Path, name) -> str:
    """A shard named by an index must be a plain ``*.safetensors`` file name in ``folder``
    (never ``../other/x``, an absolute path, or another format such as ``.npz``)."""
    if not (
        isinstance(name, str)
        and name.endswith(".safetensors")
        and "/" not in name
        and "\\" not in name
        and Path(name).name == name
    ):
        raise CheckpointError(
            f"{index} names {name!r}: only .safetensors files inside {folder} are read"
        )
    return name


def list_shards(folder: Path) -> list[Path]:
    """The safetensors files of one component, in order, checked against the index if any."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"missing component folder: {folder}")
    indexes = sorted(folder.glob(INDEX_GLOB))
    if indexes:
        weight_map = read_json(indexes[0]).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{indexes[0]} has no weight_map")
        names = sorted({_shard_name(folder, indexes[0], n) for n in weight_map.values()})
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
    tensor_infos(path)  # never hand MLX a header it could choke on
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


# Bytes per element of each safetensors dtype.
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header describes it."""

    dtype: str  # safetensors spelling: F32, BF16, U32, ...
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * DTYPE_BYTES[self.dtype]


def safetensors_header(path: Path) -> dict:
    """A safetensors file's JSON header (names -> dtype, shape, data_offsets) without reading
    any tensor, every entry checked against the file's size: a corrupt or hostile shard is a
    one-line CheckpointError, never a huge allocation or a crash inside MLX."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is not a safetensors file (only {size} bytes)")
            n = int.from_bytes(head, "little")
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(
                    f"{path} is corrupt: its header claims {n} bytes but the file has {size}"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt: its header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is corrupt: its header is not a JSON object")
    header.pop("__metadata__", None)
    for name, entry in header.items():
        _check_entry(path, name, entry, size - 8 - n)
    return header


def _check_entry(path: Path, name: str, entry, data_size: int) -> None:
    try:
        dtype, shape = entry["dtype"], tuple(entry["shape"])
        start, end = entry["data_offsets"]
        ok = (
            dtype in DTYPE_BYTES
            and all(isinstance(d, int) and d >= 0 for d in shape)
            and isinstance(start, int)
            and isinstance(end, int)
            and 0 <= start <= end <= data_size
        )
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise CheckpointError(f"{path} is corrupt: bad header entry for tensor {name!r}")
    need = TensorInfo(dtype, shape).nbytes
    if end - start != need:
        raise CheckpointError(
            f"{path} is corrupt: tensor {name!r} {dtype}{list(shape)} needs {need} bytes, "
            f"the header gives it {end - start}"
        )


def tensor_infos(path: Path) -> dict[str, TensorInfo]:
    """{name: TensorInfo} of one safetensors file (header only, checked)."""
    return {
        k: TensorInfo(v["dtype"], tuple(v["shape"])) for k, v in safetensors_header(path).items()
    }


def folder_tensors(folder: Path) -> dict[str, TensorInfo]:
    """Every tensor of a component folder's shards (headers only)."""
    tensors: dict[str, TensorInfo] = {}
    for shard in list_shards(folder):
        tensors.update(tensor_infos(shard))
    return tensors


def parameter_counts(folder: Path) -> tuple[int, int, dict[str, int]]:
    """(parameters, bytes, {dtype: parameters}) of a component, from safetensors headers only.

    Quantized linears (a packed ``U32`` weight with sibling ``.scales``) count the parameters
    they stand for: 32 / bits per packed element, bits from the component's config; their scales
    and biases count as bytes only.
    """
    folder = Path(folder)
    config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    bits = int((config.get("quantization") or {}).get("bits", 0) or 0)
    group_size = int((config.get("quantization") or {}).get("group_size", 64) or 64)
    header = folder_tensors(folder)
    params = size = 0
    dtypes: dict[str, int] = {}
    for key, info in header.items():
        count = info.size
        size += info.nbytes
        stem = key.rsplit(".", 1)[0]
        quantized = bits and f"{stem}.scales" in header
        if quantized and key.endswith((".scales", ".biases")):
            continue
        if quantized and info.dtype == "U32":
            # each layer's own bits (a plan may mix 4 and 8): packed columns x 32 / inputs
            inputs = header[f"{stem}.scales"].shape[-1] * group_size
            layer_bits = info.shape[-1] * 32 // inputs if inputs else bits
            count = count * 32 // layer_bits
            kind = f"Q{layer_bits}"
        else:
            kind = info.dtype
        params += count
        dtypes[kind] = dtypes.get(kind, 0) + count
    return params, size, dtypes
