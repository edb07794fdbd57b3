"""Shared helpers for tests: tiny checkpoints in the released Hugging Face layout."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from convert import ConvertOptions, convert_checkpoint

COMPONENT_CLASSES = {
    "transformer": ["diffusers", "QwenImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLQwenImage"],
    "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
}


def write_model_index(root: Path, components: list[str]) -> None:
    """model_index.json as diffusers writes it for QwenImagePipeline."""
    index = {"_class_name": "QwenImagePipeline", "_diffusers_version": "0.42.1"}
    for name in components:
        index[name] = COMPONENT_CLASSES[name]
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps(index, indent=2))


def convert_tiny(src: Path, dst: Path, dtype: str = "float32", **kw) -> Path:
    """Run the real converter on a tiny checkpoint."""
    return convert_checkpoint(src, dst, ConvertOptions(dtype=dtype, **kw))


def to_np(x) -> np.ndarray:
    """torch tensor or mx.array -> float64 numpy."""
    if isinstance(x, mx.array):
        return np.array(x.astype(mx.float32)).astype(np.float64)
    return x.detach().float().cpu().numpy().astype(np.float64)


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|: the parity metric used throughout."""
    a, b = to_np(ours), to_np(ref)
    assert a.shape == b.shape, f"shape mismatch {a.shape} vs {b.shape}"
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
