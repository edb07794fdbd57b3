"""Tiny random diffusers ControlNets saved as the InstantX repositories ship them."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import QwenImageControlNetModel
from tiny_transformer import CONFIGS


def build_controlnet(
    name: str = "diffusers",
    num_layers: int = 1,
    extra_condition_channels: int = 0,
    seed: int = 1,
    std: float = 0.3,
    **overrides,
) -> QwenImageControlNetModel:
    """A ControlNet with the widths of ``tiny_transformer.CONFIGS[name]`` and every parameter
    random: the zero-initialised ``controlnet_blocks`` and ``controlnet_x_embedder`` too, or
    the model would be a no-op and a parity test would prove nothing."""
    kw = dict(patch_size=2, in_channels=16, out_channels=4, joint_attention_dim=16)
    kw.update(CONFIGS[name])
    kw.update(num_layers=num_layers, extra_condition_channels=extra_condition_channels)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = QwenImageControlNetModel(**kw).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    assert all(p.abs().max() > 0 for p in model.controlnet_blocks.parameters())
    return model


def save_controlnet(model, folder: Path, shard_size: str = "30KB") -> Path:
    """config.json + (sharded) safetensors at the folder's root, no model_index.json."""
    model.save_pretrained(folder, max_shard_size=shard_size)
    return folder
