"""Qwen2.5-VL's vision tower (ViT) in MLX, used by Qwen-Image-Edit to read the input images.

Matches transformers' ``Qwen2_5_VisionTransformerPretrainedModel``:

- patch embedding: the Conv3d over (temporal 2 x 14 x 14) patches with stride = kernel is one
  matmul of each flattened patch row (C, T, P, P order, as the image processor writes it) with the
  kernel reshaped to (hidden, C*T*P*P);
- 2D rotary positions: each patch's (row, column) in the patch grid, rotating the first half of
  the rotary frequencies by the row and the second by the column (rotate-half layout);
- window attention: tokens are reordered so that every window of ``window_size`` pixels is
  contiguous (in units of 2x2 merge groups), each window attends within itself, and the blocks
  listed in ``fullatt_block_indexes`` attend over the whole image instead;
- pre-norm blocks (RMSNorm eps 1e-6), SwiGLU MLP with biases;
- the patch merger: RMSNorm, each 2x2 group of patches concatenated, Linear -> GELU -> Linear into
  the language model's width, then the window order undone.

Images run through the tower one at a time: attention never crosses images, so this equals
transformers' packed ``cu_seqlens`` form without a padded mask for the full-attention blocks.
Windows inside an image are batched, padded to the largest window with a key mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from qwen_mlx.config import ComponentConfig
from qwen_mlx.errors import CheckpointError
from qwen_mlx.loading import load_component, load_weights

VISUAL_PREFIX = "visual."


@dataclass
class VisionConfig(ComponentConfig):
    """Vision tower hyper-parameters; the defaults are Qwen2.5-VL-7B's."""

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    out_hidden_size: int = 3584
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    hidden_act: str = "silu"
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def normalize(cls, config: dict) -> dict:
        """A Qwen2.5-VL config.json (its ``vision_config``) or the vision config itself;
        ``in_chans`` (the released checkpoint) is ``in_channels``, the rotary base comes from
        ``rope_parameters`` (transformers 5) when present."""
        vision = dict(config.get("vision_config", config))
        if "in_chans" in vision and "in_channels" not in vision:
            vision["in_channels"] = vision["in_chans"]
        rope = vision.get("rope_parameters") or {}
        if rope.get("rope_type", "axial") not in ("axial", "default"):
            raise ValueError(f"unsupported vision rope type {rope.get('rope_type')!r}")
        if "rope_theta" in rope:
            vision["rope_theta"] = rope["rope_theta"]
        return vision

    def __post_init__(self) -> None:
        self.fullatt_block_indexes = tuple(int(i) for i in self.fullatt_block_indexes)
        self.rope_theta = float(self.rope_theta)
        if self.hidden_act != "silu":
            raise ValueError(f"unsupported vision hidden_act {self.hidden_act!r}")
        if self.hidden_size % self.num_heads or self.head_dim % 4:
            raise ValueError(
                f"vision hidden_size {self.hidden_size} / {self.num_heads} heads must give a "
                "head dim divisible by 4 (two rotary axes of rotate-half pairs)"
            )

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch row (C * T * P * P)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


# --- index bookkeeping (numpy; depends on the grid only) -------------------------------------


def patch_positions(h: int, w: int, merge: int) -> np.ndarray:
    """(h*w, 2) (row, column) of each patch in the processor's order (2x2 merge groups)."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // merge, merge, w // merge, merge)
    rows = rows.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    cols = cols.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    return np.stack([rows, cols], axis=-1)


def window_index(h: int, w: int, cfg: VisionConfig) -> tuple[np.ndarray, list[int]]:
    """Merge-group order that makes windows contiguous, and the size of each window in patches.

    As transformers' ``get_vision_window_index``: the merged grid (h/2, w/2) is cut into windows
    of ``window_size // merge // patch`` merged cells from the top-left; edge windows are smaller.
    """
    merge = cfg.spatial_merge_size
    gh, gw = h // merge, w // merge
    win = cfg.window_size // merge // cfg.patch_size
    if win < 1:
        raise ValueError(f"window_size {cfg.window_size} is smaller than one merged patch")
    order, sizes = [], []
    cells = np.arange(gh * gw).reshape(gh, gw)
    for r in range(0, gh, win):
        for c in range(0, gw, win):
            block = cells[r : r + win, c : c + win].reshape(-1)
            order.append(block)
            sizes.append(block.size * merge * merge)
    return np.concatenate(order), sizes


@dataclass
class Segments:
    """Attention segments over a token sequence, batched: ``gather`` (S, Lmax) token indices,
    ``mask`` (S, 1, 1, Lmax) valid keys (None when every segment is full), ``scatter`` (N,) the
    flat padded position of each token."""

    gather: mx.array
    mask: mx.array | None
    scatter: mx.array

    @classmethod
    def from_sizes(cls, sizes: list[int]) -> Segments:
        n, longest = sum(sizes), max(sizes)
        gather = np.zeros((len(sizes), longest), dtype=np.int32)
        valid = np.zeros((len(sizes), longest), dtype=bool)
        scatter = np.zeros(n, dtype=np.int32)
        start = 0
        for s, size in enumerate(sizes):
            gather[s, :size] = np.arange(start, start + size)
            valid[s, :size] = True
            scatter[start : start + size] = s * longest + np.arange(size)
            start += size
        mask = None if valid.all() else mx.array(valid[:, None, None, :])
        return cls(mx.array(gather), mask, mx.array(scatter))


# --- layers ----------------------------------------------------------------------------------


def _rotate_half(x: mx.array) -> mx.array:
    half = x.shape[-1] // 2
    return mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate-half RoPE in float32 (as transformers does), back to the input dtype."""
    xf = x.astype(mx.float32)
    return (xf * cos + _rotate_half(xf) * sin).astype(x.dtype)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.scale = cfg.head_dim**-0.5
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def __call__(
        self, x: mx.array, cos: mx.array, sin: mx.array, segments: Segments | None
    ) -> mx.array:
        """x (N, hidden); cos/sin (N, 1, head_dim); segments None = one segment of all N."""
        N, dim = x.shape
        q, k, v = self.qkv(x).reshape(N, 3, self.num_heads, -1).transpose(1, 0, 2, 3)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if segments is None:
            q, k, v = (t.transpose(1, 0, 2)[None] for t in (q, k, v))  # (1, H, N, D)
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)
            out = out[0].transpose(1, 0, 2).reshape(N, dim)
        else:
            S, L = segments.gather.shape
            q, k, v = (t[segments.gather].transpose(0, 2, 1, 3) for t in (q, k, v))
            out = mx.fast.scaled_dot_product_attention(
                q, k, v, scale=self.scale, mask=segments.mask
            )
            out = out.transpose(0, 2, 1, 3).reshape(S * L, dim)[segments.scatter]
        return self.proj(out)


class VisionMLP(nn.Module):
    """SwiGLU with biases: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=True)
        self.up_proj = nn.Linear(dim, hidden, bias=True)
        self.down_proj = nn.Linear(hidden, dim, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = nn.RMSNorm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg.hidden_size, cfg.intermediate_size)

    def __call__(
        self, x: mx.array, cos: mx.array, sin: mx.array, segments: Segments | None
    ) -> mx.array:
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """The stride = kernel Conv3d as a matmul; ``weight`` (hidden, C*T*P*P), no bias."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.weight = mx.zeros((cfg.hidden_size, cfg.patch_dim))

    def __call__(self, patches: mx.array) -> mx.array:
        return patches.astype(self.weight.dtype) @ self.weight.T


class PatchMerger(nn.Module):
    """RMSNorm, 2x2 patch groups concatenated, Linear -> GELU (erf) -> Linear."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        width = cfg.hidden_size * cfg.spatial_merge_size**2
        self.width = width
        self.ln_q = nn.RMSNorm(cfg.hidden_size, eps=1e-6)
        # A list so the weights are named mlp.0.* / mlp.2.*, as in the checkpoint.
        self.mlp = [nn.Linear(width, width), nn.GELU(), nn.Linear(width, cfg.out_hidden_size)]

    def __call__(self, x: mx.array) -> mx.array:
        x = self.ln_q(x).reshape(-1, self.width)
        for layer in self.mlp:
            x = layer(x)
        return x


class VisionTransformer(nn.Module):
    """Pixel patches (N, C*T*P*P) + grid (t, h, w) per image -> (N/4, out_hidden) features."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = [VisionBlock(cfg) for _ in range(cfg.depth)]
        self.merger = PatchMerger(cfg)
        exponents = np.arange(0, cfg.head_dim // 2, 2, dtype=np.float32) / np.float32(
            cfg.head_dim // 2
        )
        self._inv_freq = (1.0 / (np.float32(cfg.rope_theta) ** exponents)).astype(np.float32)

    @property
    def dtype(self) -> mx.Dtype:
        return self.patch_embed.weight.dtype

    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: str | mx.Dtype | None = None
    ) -> VisionTransformer:
        """The vision tower of a ``text_encoder/`` folder (converted, or converted in memory)."""
        config, weights = load_component(path, dtype, convert_dtype="bfloat16")
        return cls.from_weights(config, weights, dtype, where=str(path))

    @classmethod
    def from_weights(
        cls,
        config: dict | VisionConfig,
        weights: dict[str, mx.array],
        dtype: str | mx.Dtype | None = None,
        where: str = "text_encoder",
    ) -> VisionTransformer:
        """From the text encoder config (or its vision config) and converted weights: the
        ``visual.*`` entries are loaded (PyTorch layout; the Conv3d kernel is flattened here),
        everything else is ignored. ``dtype`` casts the weights."""
        cfg = config if isinstance(config, VisionConfig) else VisionConfig.from_dict(config)
        model = cls(cfg)
        n = len(VISUAL_PREFIX)
        items = {}
        for key, value in weights.items():
            if not key.startswith(VISUAL_PREFIX):
                continue
            key = key[n:]
            if key == "patch_embed.proj.weight":
                key, value = "patch_embed.weight", value.reshape(value.shape[0], -1)
            items[key] = value
        if not items:
            raise CheckpointError(f"{where}: no vision tower weights (visual.*)")
        load_weights(model, items, f"{where} (vision tower)", dtype)
        return model

    def _rope(self, h: int, w: int, order: np.ndarray) -> tuple[mx.array, mx.array]:
        """cos, sin (N, 1, head_dim) float32 for an h x w patch grid, in window order."""
        merge = self.config.spatial_merge_size
        pos = patch_positions(h, w, merge).astype(np.float32)
        freqs = (pos[:, :, None] * self._inv_freq).reshape(len(pos), -1)  # [rows.., cols..]
        unit = merge * merge
        freqs = freqs.reshape(-1, unit, freqs.shape[-1])[order].reshape(len(pos), -1)
        emb = mx.array(np.concatenate([freqs, freqs], axis=-1))[:, None, :]
        return mx.cos(emb), mx.sin(emb)

    def encode_image(self, patches: mx.array, h: int, w: int) -> mx.array:
        """One image's patches (h*w, patch_dim) -> merged features (h*w/4, out_hidden)."""
        cfg = self.config
        merge = cfg.spatial_merge_size
        if h % merge or w % merge:
            raise ValueError(f"patch grid {h}x{w} is not a multiple of the merge size {merge}")
        unit = merge * merge
        order, sizes = window_index(h, w, cfg)
        cos, sin = self._rope(h, w, order)
        windows = Segments.from_sizes(sizes) if len(sizes) > 1 else None

        x = self.patch_embed(patches)
        dim = x.shape[-1]
        x = x.reshape(-1, unit, dim)[mx.array(order)].reshape(-1, dim)
        full = set(cfg.fullatt_block_indexes)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, None if i in full else windows)
        out = self.merger(x)
        return out[mx.array(np.argsort(order))]

    def __call__(self, pixel_values: mx.array, grid_thw: np.ndarray | list) -> mx.array:
        """All images' patches, concatenated as the processor returns them -> features of every
        image, concatenated in the same order."""
        grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
        counts = [int(t * h * w) for t, h, w in grid]
        if sum(counts) != pixel_values.shape[0]:
            raise ValueError(
                f"{pixel_values.shape[0]} patch rows for grids {grid.tolist()} ({sum(counts)})"
            )
        if pixel_values.shape[-1] != self.config.patch_dim:
            raise ValueError(
                f"patch rows of length {pixel_values.shape[-1]}, expected {self.config.patch_dim}"
            )
        outs, start = [], 0
        for (t, h, w), n in zip(grid.tolist(), counts, strict=True):
            if t != 1:
                raise ValueError(f"only still images are supported (temporal grid {t})")
            outs.append(self.encode_image(pixel_values[start : start + n], h, w))
            start += n
        return mx.concatenate(outs, axis=0) if len(outs) > 1 else outs[0]
