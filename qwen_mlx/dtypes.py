"""The floating dtypes weights may be stored in, by name, and the one float-only cast."""

from __future__ import annotations

import mlx.core as mx

from qwen_mlx.errors import RequestError

DTYPES: dict[str, mx.Dtype] = {
    "float32": mx.float32,
    "bfloat16": mx.bfloat16,
    "float16": mx.float16,
}
DTYPE_NAMES: dict[mx.Dtype, str] = {v: k for k, v in DTYPES.items()}


def dtype_of(name: str | mx.Dtype) -> mx.Dtype:
    """An MLX dtype from its name (or itself), with an error naming the choices."""
    if isinstance(name, mx.Dtype):
        return name
    if name not in DTYPES:
        raise RequestError(f"unsupported dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def is_float(x: mx.array) -> bool:
    return mx.issubdtype(x.dtype, mx.floating)


def cast_floats(weights: dict[str, mx.array], dtype: str | mx.Dtype) -> dict[str, mx.array]:
    """Cast floating tensors to ``dtype``. Everything else (packed uint32 quantized weights,
    integer buffers) passes through untouched, so quantized checkpoints survive every cast."""
    dtype = dtype_of(dtype)
    return {
        k: v.astype(dtype) if is_float(v) and v.dtype != dtype else v for k, v in weights.items()
    }
