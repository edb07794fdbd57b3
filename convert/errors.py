"""The converter's error: a Hugging Face checkpoint that cannot be converted."""

from qwen_mlx.errors import QwenMLXError


class ConversionError(QwenMLXError, RuntimeError):
    """A checkpoint cannot be converted (missing or corrupt file, unknown layout)."""
