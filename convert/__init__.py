"""Hugging Face diffusers checkpoint → qwen-mlx MLX checkpoint."""

from qwen_mlx.convert.convert import (
    convert_checkpoint,
    convert_component,
    is_converted,
    iter_converted_component,
)
from qwen_mlx.convert.errors import ConversionError
from qwen_mlx.convert.options import ConvertOptions
from qwen_mlx.convert.progress import ConvertProgress

__all__ = [
    "ConversionError",
    "ConvertOptions",
    "ConvertProgress",
    "convert_checkpoint",
    "convert_component",
    "is_converted",
    "iter_converted_component",
]
