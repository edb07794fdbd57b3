"""qwen-mlx: MLX inference for Qwen-Image on Apple Silicon."""

from __future__ import annotations

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy so `import qwen_mlx` stays light (the CLI imports models only when needed).
    if name == "QwenImagePipeline":
        from .pipeline import QwenImagePipeline

        return QwenImagePipeline
    if name == "QwenImageEditPipeline":
        from .edit_pipeline import QwenImageEditPipeline

        return QwenImageEditPipeline
    raise AttributeError(name)


__all__ = ["QwenImageEditPipeline", "QwenImagePipeline", "__version__"]
