"""Shared helpers for tests: tiny checkpoints in the released Hugging Face layout."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np

from qwen_mlx.convert import ConvertOptions, convert_checkpoint

COMPONENT_CLASSES = {
    "transformer": ["diffusers", "QwenImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLQwenImage"],
    "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
}


# The released Qwen-Image scheduler_config.json (the tiny checkpoints use it too).
RELEASED_SCHEDULER = dict(
    base_image_seq_len=256, base_shift=0.5, invert_sigmas=False, max_image_seq_len=8192,
    max_shift=0.9, num_train_timesteps=1000, shift=1.0, shift_terminal=0.02,
    stochastic_sampling=False, time_shift_type="exponential", use_beta_sigmas=False,
    use_dynamic_shifting=True, use_exponential_sigmas=False, use_karras_sigmas=False,
)  # fmt: skip


def randomize_vae(model, seed: int = 0) -> None:
    """Every parameter of a diffusers VAE random, on a scale that keeps activations O(1): conv
    weights ~ 1/sqrt(fan_in of one temporal slice) (all three temporal taps differ), biases
    ~ 0.1, norm gammas ~ 1 +- 0.5 (so neither zeros nor ones hide a bug)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.5 * r)
            elif name.endswith("bias"):
                p.copy_(0.1 * r)
            else:
                p.copy_(r / math.sqrt(p.shape[1] * p.shape[-1] * p.shape[-2]))


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


def launch_port() -> int:
    """A port P with P and P + 1 free (``mlx.launch --starting-port P`` numbers the ranks'
    ports from P)."""
    import socket

    from qwen_mlx.distributed import free_ports

    for _ in range(50):
        (port,) = free_ports(1)
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port
    raise RuntimeError("no two consecutive free ports")
