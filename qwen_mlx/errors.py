"""Errors a user can act on: each names the file, component or value at fault.

The converter has its own ``qwen_mlx.convert.ConversionError`` (a Hugging Face checkpoint that
cannot be converted); reading an already converted checkpoint raises ``CheckpointError``.
"""

from __future__ import annotations


class QwenMLXError(Exception):
    """Base of every error qwen-mlx reports to the user in one line."""


class CheckpointError(QwenMLXError, ValueError):
    """A checkpoint (converted or not) is missing a file or holds a corrupt or mismatched one."""


class ModelNotFoundError(QwenMLXError, FileNotFoundError):
    """The model folder, component or hub repo id cannot be found (named in the message)."""


class NonFiniteError(QwenMLXError, RuntimeError):
    """Latents or an image became NaN/inf (instead of writing a black image)."""


class RequestError(QwenMLXError, ValueError):
    """A generation parameter is out of range or inconsistent (named in the message)."""


class Cancelled(QwenMLXError):
    """The run was cancelled (a ``CancelToken``, Ctrl-C, a server interrupt): nothing written."""
