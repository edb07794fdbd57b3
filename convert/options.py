"""Options shared by every component converter."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from qwen_mlx.dtypes import dtype_of
from qwen_mlx.errors import RequestError

FORMAT_VERSION = 1


@dataclass(frozen=True)
class ConvertOptions:
    dtype: str = "bfloat16"
    precision: str | None = None  # a precision plan name (qwen_mlx.precision); None = plain dtype
    variant: str | None = None  # model variant override (Qwen-Image, Edit, ...)
    quantize: int | None = None  # transformer bits (4 or 8; see qwen_mlx.quantize)
    group_size: int = 64
    quantize_text_encoder: int | None = None  # language-model bits (4 or 8)

    def __post_init__(self) -> None:
        dtype_of(self.dtype)  # validates the name
        for name in ("quantize", "quantize_text_encoder"):
            bits = getattr(self, name)
            if bits is not None and bits not in (4, 8):
                raise RequestError(f"{name} must be 4 or 8 bits, got {bits}")
        if self.group_size not in (32, 64, 128):
            raise RequestError(f"group size must be 32, 64 or 128, got {self.group_size}")

    @property
    def mx_dtype(self) -> mx.Dtype:
        return dtype_of(self.dtype)
