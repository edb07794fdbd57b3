"""Qwen-Image's VAE as a 2D image autoencoder, channels-last.

The released VAE (diffusers' ``AutoencoderKLQwenImage``, a Wan 2.x derivative) is a causal 3D
video VAE. On a single frame each causal 3D conv equals a 2D conv with the last temporal slice
of its kernel, and the temporal resampling convs never run, so the converter (``convert/vae.py``)
stores plain 2D kernels and this module is an ordinary 2D conv net. Outputs match diffusers'
``decode(z[:, :, None]).sample[:, :, 0]`` and ``encode(x[:, :, None]).latent_dist.mode()``.

Large images are processed in overlapping tiles. Only the higher-resolution part of the
network is tiled: everything at latent resolution (including the mid block, whose attention
sees the whole image) runs once on the whole latent, the convolutions above it tile by tile.
Each tile's outer ``margin`` (its receptive-field radius, computed from the config) is
discarded and the rest is blended linearly, so tiled and untiled results agree to float
rounding when the overlap exceeds twice the margin (the defaults do, for the released config).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from qwen_mlx.config import ComponentConfig
from qwen_mlx.loading import load_component, load_weights

# Released Qwen-Image values (diffusers' defaults for AutoencoderKLQwenImage).
LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

DEFAULT_TILE_SIZE = 128  # latent pixels: up to 1024x1024 images run untiled
DEFAULT_TILE_OVERLAP = 16  # latent pixels: > 2 x the released VAE's margins (6 and 6)
ATTN_MAX_SCORES = 1 << 27  # attention score elements per query chunk


@dataclass
class VAEConfig(ComponentConfig):
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # diffusers' spelling
    input_channels: int = 3
    latents_mean: tuple[float, ...] = LATENTS_MEAN
    latents_std: tuple[float, ...] = LATENTS_STD

    def __post_init__(self) -> None:
        cfg = self
        for name in (
            "dim_mult",
            "attn_scales",
            "temperal_downsample",
            "latents_mean",
            "latents_std",
        ):
            setattr(cfg, name, tuple(getattr(cfg, name)))
        if cfg.attn_scales:
            # diffusers' encoder cannot run them either (its attention blocks in down_blocks
            # are called with a feature cache they do not accept).
            raise ValueError(f"VAE config: attn_scales {list(cfg.attn_scales)} not supported")
        if len(cfg.temperal_downsample) != len(cfg.dim_mult) - 1:
            raise ValueError(
                f"VAE config: temperal_downsample has {len(cfg.temperal_downsample)} entries, "
                f"expected len(dim_mult) - 1 = {len(cfg.dim_mult) - 1}"
            )
        for name in ("latents_mean", "latents_std"):
            if len(getattr(cfg, name)) != cfg.z_dim:
                raise ValueError(f"VAE config: {name} needs z_dim = {cfg.z_dim} values")

    @property
    def scale_factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for the released VAE)."""
        return 2 ** (len(self.dim_mult) - 1)


# ----------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """diffusers' QwenImageRMS_norm over channels: F.normalize(x) * sqrt(C) * gamma.

    normalize divides by max(||x||, 1e-12); rms_norm divides by sqrt(mean(x^2) + eps), which
    is the same with eps = 1e-24 / C (up to that clamp on all-zero pixels, where both give 0).
    """

    def __init__(self, dims: int):
        super().__init__()
        self.gamma = mx.ones((dims,))
        self.eps = 1e-24 / dims

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.gamma, self.eps)


def step(x: mx.array) -> mx.array:
    """Evaluate ``x`` now. Called between full-resolution layers: left to build one big graph,
    MLX dispatches ahead and holds several layers' buffers at once (2.5x the peak memory on
    CPU at 256x256); evaluating layer by layer keeps only one layer's working set alive."""
    mx.eval(x)
    return x


def conv3x3(in_dim: int, out_dim: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_dim, out_dim, 3, stride=stride, padding=padding)


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm1 = RMSNorm(in_dim)
        self.conv1 = conv3x3(in_dim, out_dim)
        self.norm2 = RMSNorm(out_dim)
        self.conv2 = conv3x3(out_dim, out_dim)
        if in_dim != out_dim:
            self.conv_shortcut = nn.Conv2d(in_dim, out_dim, 1)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.conv_shortcut(x) if "conv_shortcut" in self else x
        x = self.conv1(nn.silu(self.norm1(x)))
        x = self.conv2(nn.silu(self.norm2(x)))
        return x + h


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """Single-head SDPA over (B, 1, L, D), in query chunks so no more than ATTN_MAX_SCORES
    scores exist at once (the VAE's head dim has no fused kernel, so scores are materialised).
    Chunking queries is exact: each query's softmax is independent."""
    n = q.shape[2]
    chunk = max(1, ATTN_MAX_SCORES // (k.shape[2] * q.shape[0]))
    if n <= chunk:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    parts = [
        mx.fast.scaled_dot_product_attention(q[:, :, i : i + chunk], k, v, scale=scale)
        for i in range(0, n, chunk)
    ]
    return mx.concatenate(parts, axis=2)


class AttentionBlock(nn.Module):
    """Single-head self-attention over all pixels, with a residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(b, 1, h * w, 3 * c)
        q, k, v = mx.split(qkv, 3, axis=-1)
        y = attention(q, k, v, scale=c**-0.5)
        return x + self.proj(y.reshape(b, h, w, c))


class MidBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.resnets = [ResidualBlock(dim, dim), ResidualBlock(dim, dim)]
        self.attentions = [AttentionBlock(dim)]

    def __call__(self, x: mx.array) -> mx.array:
        x = self.resnets[0](x)
        return self.resnets[1](self.attentions[0](x))


class Downsample(nn.Module):
    """Pad right and bottom by one, then a stride-2 3x3 conv."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = conv3x3(dim, dim, stride=2, padding=0)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv(mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]))


class Upsample(nn.Module):
    """Nearest 2x, then a 3x3 conv that halves the channels."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = conv3x3(dim, dim // 2)

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        x = mx.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
        return self.conv(x.reshape(b, 2 * h, 2 * w, c))


class UpBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_resnets: int, upsample: bool):
        super().__init__()
        self.resnets = [
            ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(num_resnets)
        ]
        if upsample:
            self.upsample = Upsample(out_dim)

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = step(resnet(x))
        return step(self.upsample(x)) if "upsample" in self else x


# ----------------------------------------------------------------------------- encoder / decoder


class Encoder(nn.Module):
    """Image (B, H, W, 3) -> moments (B, H/s, W/s, 2 z_dim), before quant_conv.

    ``local`` (conv_in and the down blocks up to the last Downsample) only looks at a
    neighbourhood of each pixel and can be tiled; ``head`` (everything at latent resolution:
    the last stage's residual blocks, the mid block with its global attention, norm, conv_out)
    runs on the whole latent grid.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv_in = conv3x3(cfg.input_channels, dims[0])
        # Flat list in diffusers' order, so weight indices line up.
        self.down_blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            for _ in range(cfg.num_res_blocks):
                self.down_blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(cfg.dim_mult) - 1:
                self.down_blocks.append(Downsample(out_dim))
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = conv3x3(dims[-1], 2 * cfg.z_dim)
        downs = [i for i, b in enumerate(self.down_blocks) if isinstance(b, Downsample)]
        self.split = downs[-1] + 1 if downs else 0  # down_blocks[:split] are local

    def local(self, x: mx.array) -> mx.array:
        x = step(self.conv_in(x))
        for layer in self.down_blocks[: self.split]:
            x = step(layer(x))
        return x

    def head(self, x: mx.array) -> mx.array:
        for layer in self.down_blocks[self.split :]:
            x = layer(x)
        x = self.mid_block(x)
        return self.conv_out(nn.silu(self.norm_out(x)))

    def margin(self) -> Fraction:
        """Receptive-field radius of ``local`` in latent pixels (how far a tile edge leaks)."""
        local = self.down_blocks[: self.split]
        px = Fraction(1, 2 ** sum(isinstance(b, Downsample) for b in local))
        r = px  # conv_in
        for layer in local:
            r += 2 * px  # two 3x3 convs, or a stride-2 conv reading pixels 2j..2j+2
            if isinstance(layer, Downsample):
                px *= 2
        return r

    def __call__(self, x: mx.array) -> mx.array:
        return self.head(self.local(x))


class Decoder(nn.Module):
    """Latent (B, h, w, z_dim), after post_quant_conv -> image (B, s h, s w, 3), unclamped.

    ``head`` (everything at latent resolution: conv_in, the mid block with its global
    attention, the first up block) runs on the whole latent grid; ``local`` (the other up
    blocks, norm, conv_out) can be tiled. Its input has ``head_scale`` pixels per latent pixel.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.base_dim * m for m in (mult[-1], *mult[::-1])]
        self.conv_in = conv3x3(cfg.z_dim, dims[0])
        self.mid_block = MidBlock(dims[0])
        self.up_blocks = [
            UpBlock(
                dims[i] // 2 if i > 0 else dims[i],  # the previous Upsample halved them
                dims[i + 1],
                cfg.num_res_blocks + 1,
                upsample=i != len(mult) - 1,
            )
            for i in range(len(mult))
        ]
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = conv3x3(dims[-1], cfg.input_channels)
        self.head_scale = 2 if "upsample" in self.up_blocks[0] else 1

    def head(self, z: mx.array) -> mx.array:
        return self.up_blocks[0](self.mid_block(self.conv_in(z)))

    def local(self, x: mx.array) -> mx.array:
        for block in self.up_blocks[1:]:
            x = block(x)
        return self.conv_out(nn.silu(self.norm_out(x)))

    def margin(self) -> Fraction:
        """Receptive-field radius of ``local`` in latent pixels."""
        px, r = Fraction(1, self.head_scale), Fraction(0)
        for block in self.up_blocks[1:]:
            r += 2 * len(block.resnets) * px
            if "upsample" in block:
                px /= 2
                r += px
        return r + px  # conv_out

    def __call__(self, z: mx.array) -> mx.array:
        return self.local(self.head(z))


# ----------------------------------------------------------------------------- tiling


def tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Cover [0, length) with equal tiles of at most ``tile`` that overlap by >= ``overlap``."""
    if length <= tile:
        return [(0, length)]
    n = math.ceil((length - overlap) / (tile - overlap))
    size = math.ceil((length + (n - 1) * overlap) / n)
    starts = [min(i * (size - overlap), length - size) for i in range(n)]
    return [(s, s + size) for s in starts]


def blend_weights(
    spans: list[tuple[int, int]], length: int, overlap: int, margin: int, scale: int
) -> list[mx.array]:
    """Per-span 1D weights over output pixels (``scale`` per unit) that sum to one.

    Near an inner tile edge the weight is 0 for ``margin`` units (pixels the edge disturbs),
    then ramps linearly to 1 over the rest of the overlap.
    """
    width = max(overlap - 2 * margin, 1) * scale
    raw = []
    for s, e in spans:
        p = mx.arange((e - s) * scale, dtype=mx.float32) + 0.5
        w = mx.ones_like(p)
        if s > 0:
            w = w * mx.clip((p - margin * scale) / width, 0.0, 1.0)
        if e < length:
            w = w * mx.clip(((e - s - margin) * scale - p) / width, 0.0, 1.0)
        raw.append(w)
    total = mx.zeros((length * scale,), dtype=mx.float32)
    for (s, e), w in zip(spans, raw, strict=True):
        total = total.at[s * scale : e * scale].add(w)
    return [w / total[s * scale : e * scale] for (s, e), w in zip(spans, raw, strict=True)]


def run_tiled(
    fn: Callable[[mx.array], mx.array],
    x: mx.array,
    unit_in: int,
    unit_out: int,
    tile: int,
    overlap: int,
    margin: int,
) -> mx.array:
    """Apply a local (translation-equivariant) ``fn`` tile by tile and blend the tiles.

    ``x`` is (B, H, W, C) with ``unit_in`` pixels per unit along each side, ``fn``'s output has
    ``unit_out`` pixels per unit; ``tile``, ``overlap`` and ``margin`` are in units. Each tile is
    evaluated before the next starts, so only one tile's activations are alive at a time.
    """
    b, h, w = x.shape[0], x.shape[1] // unit_in, x.shape[2] // unit_in
    margin = max(0, min(margin, (overlap - 1) // 2))
    rows, cols = tile_spans(h, tile, overlap), tile_spans(w, tile, overlap)
    wy = blend_weights(rows, h, overlap, margin, unit_out)
    wx = blend_weights(cols, w, overlap, margin, unit_out)
    out = None
    for (y0, y1), row_w in zip(rows, wy, strict=True):
        for (x0, x1), col_w in zip(cols, wx, strict=True):
            t = fn(x[:, y0 * unit_in : y1 * unit_in, x0 * unit_in : x1 * unit_in])
            t = t * (row_w[:, None, None] * col_w[None, :, None]).astype(t.dtype)
            if out is None:
                out = mx.zeros((b, h * unit_out, w * unit_out, t.shape[-1]), dtype=t.dtype)
            ys = slice(y0 * unit_out, y1 * unit_out)
            xs = slice(x0 * unit_out, x1 * unit_out)
            out = out.at[:, ys, xs].add(t)
            mx.eval(out)
    return out


# ----------------------------------------------------------------------------- the VAE


class QwenImageVAE(nn.Module):
    """Encoder + decoder of Qwen-Image's VAE for single images, channels-last."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_dim, 2 * config.z_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder(config)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str | mx.Dtype | None = None) -> QwenImageVAE:
        """Load a ``vae/`` folder (converted, or a diffusers one converted in memory in
        float32). ``dtype`` casts the weights after loading."""
        config, weights = load_component(path)
        return cls.from_weights(config, weights, dtype=dtype, where=str(path))

    @classmethod
    def from_weights(
        cls,
        config: dict,
        weights: dict[str, mx.array],
        dtype: str | mx.Dtype | None = None,
        where: str = "vae",
    ) -> QwenImageVAE:
        """Build from a converted config and its MLX-named weights, cast to ``dtype`` if given."""
        model = cls(VAEConfig.from_dict(config))
        load_weights(model, weights, where, dtype)
        mx.eval(model.parameters())
        return model

    @property
    def latents_mean(self) -> list[float]:
        return list(self.config.latents_mean)

    @property
    def latents_std(self) -> list[float]:
        return list(self.config.latents_std)

    @property
    def scale_factor(self) -> int:
        return self.config.scale_factor

    @property
    def dtype(self) -> mx.Dtype:
        return self.post_quant_conv.weight.dtype

    def decode(
        self,
        z: mx.array,
        tile_size: int | None = DEFAULT_TILE_SIZE,
        tile_overlap: int = DEFAULT_TILE_OVERLAP,
        clip: bool = True,
    ) -> mx.array:
        """Latent (B, h, w, z_dim) in the VAE's own space (after z * std + mean) -> image
        (B, s h, s w, 3) in [-1, 1], s = scale_factor (unclipped with ``clip=False``, so a
        caller can check finiteness first: clipping turns -inf into a silent black pixel).

        Latents with a side over ``tile_size`` (latent pixels; None never tiles) are decoded
        in tiles overlapping by ``tile_overlap``.
        """
        zd = self.config.z_dim
        if z.ndim != 4 or z.shape[-1] != zd:
            hint = " (looks channels-first)" if z.ndim == 4 and z.shape[1] == zd else ""
            raise ValueError(
                f"decode expects a channels-last latent of shape (B, h, w, {zd}), "
                f"got shape {tuple(z.shape)}{hint}"
            )
        x = self.decoder.head(self.post_quant_conv(z.astype(self.dtype)))
        if self._tiles(z.shape, tile_size, tile_overlap):
            margin = math.ceil(self.decoder.margin())
            unit_in = self.decoder.head_scale
            x = run_tiled(
                self.decoder.local, x, unit_in, self.scale_factor, tile_size, tile_overlap, margin
            )
        else:
            x = self.decoder.local(x)
        return mx.clip(x, -1.0, 1.0) if clip else x

    def encode(
        self,
        x: mx.array,
        tile_size: int | None = DEFAULT_TILE_SIZE,
        tile_overlap: int = DEFAULT_TILE_OVERLAP,
    ) -> mx.array:
        """Image (B, H, W, 3) in [-1, 1] -> latent mean (B, H/s, W/s, z_dim) in the VAE's own
        space (diffusers' ``latent_dist.mode()``). H and W must be multiples of s.

        Tiling as in ``decode``, with sizes in latent pixels.
        """
        s, c = self.scale_factor, self.config.input_channels
        if x.ndim != 4 or x.shape[-1] != c:
            hint = " (looks channels-first)" if x.ndim == 4 and x.shape[1] == c else ""
            raise ValueError(
                f"encode expects a channels-last image of shape (B, H, W, {c}), "
                f"got shape {tuple(x.shape)}{hint}"
            )
        if x.shape[1] % s or x.shape[2] % s:
            raise ValueError(
                f"encode needs height and width that are multiples of {s}, "
                f"got shape {tuple(x.shape)}"
            )
        x = x.astype(self.dtype)
        grid = (x.shape[0], x.shape[1] // s, x.shape[2] // s)
        if self._tiles(grid, tile_size, tile_overlap):
            margin = math.ceil(self.encoder.margin())
            h = run_tiled(self.encoder.local, x, s, 1, tile_size, tile_overlap, margin)
        else:
            h = self.encoder.local(x)
        moments = self.quant_conv(self.encoder.head(h))
        return moments[..., : self.config.z_dim]

    @staticmethod
    def _tiles(shape: tuple[int, ...], tile_size: int | None, tile_overlap: int) -> bool:
        """Whether a latent grid of ``shape`` (B, h, w, ...) is processed in tiles."""
        if tile_size is None or max(shape[1], shape[2]) <= tile_size:
            return False
        if not 0 <= tile_overlap < tile_size:
            raise ValueError(
                f"tile_overlap must be in [0, tile_size); got {tile_overlap} and {tile_size}"
            )
        return True
