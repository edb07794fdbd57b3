"""Errors the user can act on: each names the file or value at fault."""


class ConversionError(RuntimeError):
    """A checkpoint cannot be converted (missing or corrupt file, unknown layout)."""
