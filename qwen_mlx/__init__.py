"""qwen-mlx: MLX inference for Qwen-Image on Apple Silicon."""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "QwenImagePipeline": "qwen_mlx.pipelines.txt2img",
    "QwenImageEditPipeline": "qwen_mlx.pipelines.edit",
    "GenerationRequest": "qwen_mlx.request",
    "ImageResult": "qwen_mlx.request",
    "CancelToken": "qwen_mlx.pipelines.denoise",
    "StepEvent": "qwen_mlx.pipelines.denoise",
}


def __getattr__(name: str):
    # Lazy so `import qwen_mlx` stays light (the CLI imports models only when needed).
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)


__all__ = [*_LAZY, "__version__"]
