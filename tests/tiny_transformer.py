"""Tiny random diffusers transformers saved in the released layout."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import QwenImageTransformer2DModel
from helpers import write_model_index

# The diffusers tests' tiny config, plus an odd head count and uneven RoPE axes.
CONFIGS = {
    "diffusers": dict(num_attention_heads=3, attention_head_dim=16, axes_dims_rope=(8, 4, 4)),
    "odd_heads": dict(num_attention_heads=5, attention_head_dim=8, axes_dims_rope=(2, 2, 4)),
    "deeper": dict(
        num_attention_heads=4, attention_head_dim=16, axes_dims_rope=(4, 6, 6), num_layers=3
    ),
    # Width 64: a multiple of MLX's default quantization group size (quantization, adaLN tests).
    "quantizable": dict(
        num_attention_heads=2, attention_head_dim=32, axes_dims_rope=(8, 12, 12), num_layers=3
    ),
}


def build_transformer(
    name: str = "diffusers", seed: int = 0, std: float = 0.3, **overrides
) -> QwenImageTransformer2DModel:
    """A tiny model with every parameter random (nothing hides behind zeros or ones)."""
    kw = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, joint_attention_dim=16)
    kw.update(CONFIGS[name])
    kw.update(overrides)
    torch.manual_seed(seed)
    model = QwenImageTransformer2DModel(**kw).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


def save_checkpoint(model, root: Path, shard_size: str = "20KB") -> Path:
    """Save as the released checkpoint is laid out: model_index.json + sharded transformer/."""
    write_model_index(root, ["transformer"])
    model.save_pretrained(root / "transformer", max_shard_size=shard_size)
    return root
