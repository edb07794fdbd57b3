"""The converter's error: a Hugging Face checkpoint that cannot be converted."""

from qwen_mlx.errors import QwenMLXError


class ConversionError(QwenMLXError, RuntimeError):
    """A checkpoint cannot be converted (missing or corrupt file, unknown layout)."""


class ConversionInterrupted(BaseException):
    """SIGTERM or SIGHUP during a conversion (a BaseException, like KeyboardInterrupt, so that no
    ``except Exception`` on the way mistakes it for a failure of its own)."""

    def __init__(self, signum: int):
        import signal

        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
