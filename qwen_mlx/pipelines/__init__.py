"""Pipelines: the stages every mode shares (``components``, ``denoise``, ``sampler``,
``img2img``) and the two entry points, text-to-image (``txt2img``) and Edit (``edit``)."""

from __future__ import annotations


def __getattr__(name: str):
    # Lazy: importing the package does not import MLX models.
    if name == "QwenImagePipeline":
        from .txt2img import QwenImagePipeline

        return QwenImagePipeline
    if name == "QwenImageEditPipeline":
        from .edit import QwenImageEditPipeline

        return QwenImageEditPipeline
    raise AttributeError(name)


__all__ = ["QwenImageEditPipeline", "QwenImagePipeline"]
