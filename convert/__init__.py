"""Hugging Face diffusers checkpoint → qwen-mlx MLX checkpoint."""

from .convert import convert_checkpoint, convert_component, is_converted, iter_converted_component
from .errors import ConversionError
from .options import ConvertOptions

__all__ = [
    "ConversionError",
    "ConvertOptions",
    "convert_checkpoint",
    "convert_component",
    "is_converted",
    "iter_converted_component",
]
