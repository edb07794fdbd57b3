"""Options shared by every component converter."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from qwen_mlx.dtypes import dtype_of

FORMAT_VERSION = 1


@dataclass(frozen=True)
class ConvertOptions:
    dtype: str = "bfloat16"
    precision: str | None = None  # a precision plan name (qwen_mlx.precision); None = plain dtype
    variant: str | None = None  # model variant override (Qwen-Image, Edit, ...)

    def __post_init__(self) -> None:
        dtype_of(self.dtype)  # validates the name

    @property
    def mx_dtype(self) -> mx.Dtype:
        return dtype_of(self.dtype)
