"""AutoencoderKLQwenImage (a causal 3D video VAE) → a 2D image VAE in MLX layout.

For a single frame every causal 3D convolution (kernel t x 3 x 3, two zero frames padded in
front) sees zeros in all but its last temporal tap, so it *is* a 2D convolution with the last
temporal slice of the kernel. The temporal resampling convs (``time_conv``) are skipped by
diffusers on the first frame (its feature cache starts empty), so they are dropped. Both folds
are exact, not approximations.

Weight layout: MLX convolutions take (out, kh, kw, in) kernels; the channel RMS-norm gammas,
stored broadcastable as (C, 1, 1, 1) or (C, 1, 1), become (C,).
"""

from __future__ import annotations

import mlx.core as mx

from qwen_mlx.convert.options import ConvertOptions
from qwen_mlx.convert.rules import rename
from qwen_mlx.dtypes import cast_floats
from qwen_mlx.models.vae import LATENTS_MEAN, LATENTS_STD

# diffusers name -> MLX module tree of qwen_mlx.models.vae
RULES = [
    (r"\.upsamplers\.0\.resample\.1\.", ".upsample.conv."),
    (r"\.resample\.1\.", ".conv."),
]


def is_temporal_only(name: str) -> bool:
    """Weights that a single frame never uses (the Resample blocks' causal time convs)."""
    return ".time_conv." in name


def fold_kernel(w: mx.array) -> mx.array:
    """A diffusers conv kernel, 3D (out, in, t, kh, kw) or 2D (out, in, kh, kw), as the 2D
    (out, kh, kw, in) kernel MLX wants. 3D kernels keep their last temporal slice: the one that
    meets the current frame under causal padding."""
    if w.ndim == 5:
        w = w[:, :, -1]
    if w.ndim != 4:
        raise ValueError(f"expected a 4D or 5D conv kernel, got shape {tuple(w.shape)}")
    return w.transpose(0, 2, 3, 1)


def convert_weights(
    weights: dict[str, mx.array], config: dict, options: ConvertOptions
) -> dict[str, mx.array]:
    out: dict[str, mx.array] = {}
    for name, w in weights.items():
        if is_temporal_only(name):
            continue
        if name.endswith(".weight") and w.ndim in (4, 5):
            w = fold_kernel(w)
        elif name.endswith(".gamma"):
            w = w.reshape(-1)
        out[rename(name, RULES)] = w
    return cast_floats(out, options.mx_dtype)


def convert_config(config: dict, options: ConvertOptions) -> dict:
    z_dim = config.get("z_dim", 16)
    if z_dim == len(LATENTS_MEAN):
        config.setdefault("latents_mean", list(LATENTS_MEAN))
        config.setdefault("latents_std", list(LATENTS_STD))
    qm = dict(config.get("qwen_mlx", {}))
    qm["folded"] = [
        "3d->2d conv kernels (last temporal slice), laid out (out, kh, kw, in)",
        "dropped temporal convs (time_conv)",
        "rms-norm gammas reshaped to (C,)",
    ]
    config["qwen_mlx"] = qm
    return config
