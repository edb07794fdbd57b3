"""Options shared by every component converter."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ConvertOptions:
    dtype: str = "bfloat16"
    precision: str | None = (
        None  # a precision plan name (see qwen_mlx.precision); None = plain dtype
    )
    variant: str | None = None  # model variant override (Qwen-Image, Edit, ...)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"unsupported dtype {self.dtype!r}; choose one of {sorted(DTYPES)}")

    @property
    def mx_dtype(self) -> mx.Dtype:
        return DTYPES[self.dtype]


def cast_floats(weights: dict[str, mx.array], dtype: mx.Dtype) -> dict[str, mx.array]:
    """Cast floating tensors to ``dtype``; integer tensors (e.g. quantized) pass through."""
    return {
        k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()
    }
