"""The Qwen-Image MMDiT: 60 dual-stream blocks with joint text/image attention.

Matches diffusers' ``QwenImageTransformer2DModel``. Residual streams are float32; every linear
computes in its weights' dtype, which the precision plan decides (see ``qwen_mlx.precision``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from qwen_mlx.config import ComponentConfig
from qwen_mlx.dtypes import is_float
from qwen_mlx.errors import CheckpointError
from qwen_mlx.loading import load_component, load_weights
from qwen_mlx.precision import (
    PrecisionPlan,
    compute_dtype,
    fold_weight,
    plan_dtype,
    resolve_plan,
    run_linear,
)
from qwen_mlx.quantize import (
    group_size_of,
    is_quantized,
    linear_shapes,
    quantization_config,
    quantize_model,
    quantize_stream,
    transformer_plan,
)
from qwen_mlx.variants import detect_variant

F32 = mx.float32

# The weights whose outputs depend on sigma only (the adaLN cache precomputes them).
MODULATION_WEIGHTS = re.compile(r"^(time_embed|norm_out\.linear|blocks\.\d+\.(img|txt)_mod)\.")


@dataclass
class TransformerConfig(ComponentConfig):
    patch_size: int = 2
    in_channels: int = 64
    out_channels: int | None = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    guidance_embeds: bool = False
    zero_cond_t: bool = False
    use_additional_t_cond: bool = False
    use_layer3d_rope: bool = False
    rope_theta: float = 10000.0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        self.axes_dims_rope = tuple(self.axes_dims_rope)
        unsupported = [
            k
            for k in ("guidance_embeds", "use_additional_t_cond", "use_layer3d_rope")
            if getattr(self, k)
        ]
        if unsupported:
            raise ValueError(f"transformer config uses features not supported yet: {unsupported}")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim "
                f"{self.attention_head_dim}"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.patch_size**2 * (self.out_channels or self.in_channels)


# ----------------------------------------------------------------------------- embeddings


def timestep_embedding(sigma: mx.array, dim: int = 256) -> mx.array:
    """Sinusoidal embedding of sigma*1000 as [cos, sin] (diffusers' Timesteps, flip_sin_to_cos)."""
    half = dim // 2
    freqs = mx.exp(-math.log(10000.0) * mx.arange(half, dtype=F32) / half)
    args = (sigma.astype(F32)[:, None] * freqs[None]) * 1000.0
    return mx.concatenate([mx.cos(args), mx.sin(args)], axis=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(256, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def __call__(self, sigma: mx.array) -> mx.array:
        x = run_linear(self.linear_1, timestep_embedding(sigma))
        return run_linear(self.linear_2, nn.silu(x)).astype(F32)


def _axis_angles(positions: np.ndarray, dim: int, theta: float) -> np.ndarray:
    """Rotation angles for one RoPE axis, in float32 exactly as diffusers computes them."""
    inv = 1.0 / np.power(
        np.float32(theta), np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    )
    return np.outer(positions.astype(np.float32), inv.astype(np.float32)).astype(np.float32)


@lru_cache(maxsize=32)
def rope_tables(
    image_shapes: tuple[tuple[int, int, int], ...],
    text_len: int,
    axes_dims: tuple[int, int, int],
    theta: float,
) -> tuple[mx.array, mx.array]:
    """cos and sin, shape (text_len + image tokens, 1, head_dim/2), for [text; images] order.

    Image j sits at frame j (+ its own frame index); heights and widths are centred; text token i
    sits at (m+i, m+i, m+i) with m the largest half-side over the images.
    """
    blocks, offset = [], 0
    for j, (f, h, w) in enumerate(image_shapes):
        frame = np.arange(j, j + f)
        rows = np.arange(-(h - h // 2), h // 2)
        cols = np.arange(-(w - w // 2), w // 2)
        grid = np.stack(np.meshgrid(frame, rows, cols, indexing="ij"), axis=-1).reshape(-1, 3)
        blocks.append(grid)
        offset = max(offset, h // 2, w // 2)
    text = np.repeat(np.arange(offset, offset + text_len)[:, None], 3, axis=1)
    pos = np.concatenate([text, *blocks], axis=0)
    angles = np.concatenate(
        [_axis_angles(pos[:, a], axes_dims[a], theta) for a in range(3)], axis=1
    )
    cos = np.cos(angles.astype(np.float64)).astype(np.float32)[:, None, :]
    sin = np.sin(angles.astype(np.float64)).astype(np.float32)[:, None, :]
    return mx.array(cos), mx.array(sin)


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate interleaved pairs (x[2k], x[2k+1]) of x (B, S, H, D) in float32."""
    shape = x.shape
    xf = x.astype(F32).reshape(*shape[:-1], -1, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = mx.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(shape).astype(x.dtype)


# ----------------------------------------------------------------------------- blocks


def layer_norm(x: mx.array, eps: float = 1e-6) -> mx.array:
    return mx.fast.layer_norm(x, None, None, eps)


class JointAttention(nn.Module):
    """Joint attention over [text; image] with per-stream projections and q/k RMSNorm."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner) for _ in range(3))
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (
            nn.Linear(dim, inner) for _ in range(3)
        )
        self.to_out = nn.Linear(inner, dim)
        self.to_add_out = nn.Linear(inner, dim)
        self.norm_q, self.norm_k = nn.RMSNorm(head_dim, eps), nn.RMSNorm(head_dim, eps)
        self.norm_added_q, self.norm_added_k = nn.RMSNorm(head_dim, eps), nn.RMSNorm(head_dim, eps)

    def _heads(self, x: mx.array) -> mx.array:
        return x.reshape(*x.shape[:2], self.heads, self.head_dim)

    def __call__(
        self,
        img: mx.array,
        txt: mx.array,
        mask: mx.array | None,
        rope: tuple[mx.array, mx.array],
    ) -> tuple[mx.array, mx.array]:
        B, T = txt.shape[:2]
        # Cast each stream once for its q/k/v projections (to_v may differ under a mixed plan).
        img = img.astype(compute_dtype(self.to_q))
        txt = txt.astype(compute_dtype(self.add_q_proj))
        v = mx.concatenate(
            [
                self._heads(run_linear(self.add_v_proj, txt)),
                self._heads(run_linear(self.to_v, img)),
            ],
            axis=1,
        )
        dtype = v.dtype  # attention runs in the value path's dtype
        q = mx.concatenate(
            [
                self.norm_added_q(self._heads(run_linear(self.add_q_proj, txt))),
                self.norm_q(self._heads(run_linear(self.to_q, img))),
            ],
            axis=1,
        )
        k = mx.concatenate(
            [
                self.norm_added_k(self._heads(run_linear(self.add_k_proj, txt))),
                self.norm_k(self._heads(run_linear(self.to_k, img))),
            ],
            axis=1,
        )
        q, k = apply_rope(q, *rope).astype(dtype), apply_rope(k, *rope).astype(dtype)
        out = mx.fast.scaled_dot_product_attention(
            q.transpose(0, 2, 1, 3),
            k.transpose(0, 2, 1, 3),
            v.transpose(0, 2, 1, 3),
            scale=self.head_dim**-0.5,
            mask=mask,
        )
        out = out.transpose(0, 2, 1, 3).reshape(B, -1, self.heads * self.head_dim)
        txt_out = run_linear(self.to_add_out, out[:, :T]).astype(F32)
        img_out = run_linear(self.to_out, out[:, T:]).astype(F32)
        return img_out, txt_out


class FeedForward(nn.Module):
    """Linear -> GELU(tanh) -> Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        self.in_scale = 1.0  # set by the precision plan

    def __call__(self, x: mx.array) -> mx.array:
        if self.in_scale == 1.0:
            h = run_linear(self.up, x)
        else:  # the plan computes the up-projection on x / s and undoes it in float32
            h = run_linear(self.up, x * (1.0 / self.in_scale)).astype(F32) * self.in_scale
        return run_linear(self.down, nn.gelu_approx(h)).astype(F32)


def modulate(x: mx.array, shift: mx.array, scale: mx.array) -> mx.array:
    return x * (1 + scale) + shift


class ImageModulation:
    """The image stream's two (shift, scale, gate) triples, for every token alike, or (Edit-2511,
    ``zero_cond_t``) the timestep's for the first ``split`` (noisy) tokens and t = 0's for the
    reference-image tokens after them."""

    def __init__(self, mod: list[mx.array], zero: list[mx.array] | None, split: int) -> None:
        self.mod, self.zero, self.split = mod, zero, split

    def _per_segment(self, x: mx.array, fn) -> mx.array:
        if self.zero is None:
            return fn(x, self.mod)
        n = self.split
        return mx.concatenate([fn(x[:, :n], self.mod), fn(x[:, n:], self.zero)], axis=1)

    def modulate(self, x: mx.array, i: int) -> mx.array:
        """Triple ``i`` (0: before attention, 1: before the MLP) applied to x."""
        return self._per_segment(x, lambda t, m: modulate(t, m[3 * i], m[3 * i + 1]))

    def gate(self, x: mx.array, i: int) -> mx.array:
        return self._per_segment(x, lambda t, m: m[3 * i + 2] * t)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        dim = cfg.inner_dim
        self.img_mod = nn.Linear(dim, 6 * dim)
        self.txt_mod = nn.Linear(dim, 6 * dim)
        self.attn = JointAttention(dim, cfg.num_attention_heads, cfg.attention_head_dim, cfg.eps)
        self.img_mlp = FeedForward(dim, 4 * dim)
        self.txt_mlp = FeedForward(dim, 4 * dim)
        self.eps = cfg.eps

    def modulation(self, temb_act: mx.array) -> tuple[mx.array, mx.array]:
        """(img_mod, txt_mod) outputs, (B, 6*dim) each, in their linears' compute dtype."""
        return run_linear(self.img_mod, temb_act), run_linear(self.txt_mod, temb_act)

    def __call__(
        self,
        img: mx.array,
        txt: mx.array,
        modulation: tuple[mx.array, mx.array],
        mask: mx.array | None,
        rope: tuple[mx.array, mx.array],
        zero_cond: tuple[mx.array, int] | None = None,
        attention: Callable | None = None,
    ) -> tuple[mx.array, mx.array]:
        """``modulation``: this block's (img_mod, txt_mod) outputs; ``zero_cond``: (img_mod's
        output at t = 0, noisy token count) under ``zero_cond_t``; ``attention`` replaces
        ``self.attn`` (a step cache predicting its output)."""

        def split6(m: mx.array) -> list[mx.array]:
            return mx.split(m.astype(F32)[:, None], 6, axis=-1)

        zero, split = (split6(zero_cond[0]), zero_cond[1]) if zero_cond else (None, 0)
        img_mod = ImageModulation(split6(modulation[0]), zero, split)
        txt_mod = split6(modulation[1])
        t_shift, t_scale, t_gate = txt_mod[:3]
        img_attn, txt_attn = (attention or self.attn)(
            img_mod.modulate(layer_norm(img, self.eps), 0),
            modulate(layer_norm(txt, self.eps), t_shift, t_scale),
            mask,
            rope,
        )
        img = img + img_mod.gate(img_attn, 0)
        txt = txt + t_gate * txt_attn

        img = img + img_mod.gate(self.img_mlp(img_mod.modulate(layer_norm(img, self.eps), 1)), 1)
        shift, scale, gate = txt_mod[3:]
        txt = txt + gate * self.txt_mlp(modulate(layer_norm(txt, self.eps), shift, scale))
        return img, txt


class OutputNorm(nn.Module):
    """AdaLayerNormContinuous: note its (scale, shift) order."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.eps = eps

    def modulation(self, temb_act: mx.array) -> mx.array:
        return run_linear(self.linear, temb_act)

    def __call__(self, x: mx.array, modulation: mx.array) -> mx.array:
        scale, shift = mx.split(modulation.astype(F32)[:, None], 2, axis=-1)
        return modulate(layer_norm(x, self.eps), shift, scale)


@dataclass
class Modulation:
    """Every sigma-only vector of one forward pass, in the dtype its linear computed in.

    ``blocks[i]`` is block i's (img_mod, txt_mod) output, (B, 6*dim) each; ``out`` the output
    norm's (B, 2*dim). B may be 1 for a batch that shares one sigma (e.g. true CFG).
    """

    blocks: list[tuple[mx.array, mx.array]]
    out: mx.array
    zero: list[mx.array] | None = None  # zero_cond_t: each block's img_mod output at t = 0

    def arrays(self) -> list[mx.array]:
        return [m for pair in self.blocks for m in pair] + [self.out] + list(self.zero or [])


# ----------------------------------------------------------------------------- model


class CompiledBlocks:
    """Compiled block forwards, traced once per block (and per input shape).

    ``inputs=block`` makes each call read the block's current parameters, so replaced weights
    (a fused LoRA, a new cast) are seen; Python constants (norm eps, the FFN input scale) and
    module types are baked in, so the model builds a new ``CompiledBlocks`` when those change.
    A plain object, not a dict: ``nn.Module`` would treat a dict attribute as a child module.
    """

    def __init__(self, enabled: bool = False):
        self.enabled = enabled
        self.fns: dict[int, Callable] = {}

    def __call__(self, block: nn.Module) -> Callable:
        if not self.enabled:
            return block
        fn = self.fns.get(id(block))
        if fn is None:
            fn = self.fns[id(block)] = mx.compile(block.__call__, inputs=block)
        return fn


# A step cache's hook: (img, txt, run_blocks) -> the image stream after the blocks.
BlocksHook = Callable[[mx.array, mx.array, Callable], mx.array]


def _rows(x, rows: mx.array | None):
    """Batch rows ``rows`` of a modulation array (or tuple of them); a batch of 1 broadcasts."""
    if isinstance(x, tuple):
        return tuple(_rows(a, rows) for a in x)
    return x if rows is None or x.shape[0] == 1 else x[rows]


def _normalize_shapes(img_shapes, batch: int) -> tuple[tuple[int, int, int], ...]:
    if img_shapes is None or len(img_shapes) == 0:
        raise ValueError("img_shapes is required: a (frames, h, w) per batch item")
    items = []
    for item in img_shapes:
        if len(item) == 3 and all(isinstance(v, (int, np.integer)) for v in item):
            item = [item]
        items.append(tuple(tuple(int(v) for v in s) for s in item))
    if any(it != items[0] for it in items):
        raise ValueError(f"every batch item must share one image layout, got {items}")
    return items[0]


class QwenImageTransformer(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = cfg = config
        dim = cfg.inner_dim
        self.time_embed = TimestepEmbedder(dim)
        self.txt_norm = nn.RMSNorm(cfg.joint_attention_dim, eps=1e-6)
        self.img_in = nn.Linear(cfg.in_channels, dim)
        self.txt_in = nn.Linear(cfg.joint_attention_dim, dim)
        self.blocks = [TransformerBlock(cfg) for _ in range(cfg.num_layers)]
        self.norm_out = OutputNorm(dim, 1e-6)
        self.proj_out = nn.Linear(dim, cfg.output_channels)
        self.plan = PrecisionPlan.uniform("float32", cfg.num_layers)
        self.compiled = CompiledBlocks()

    def compile(self, enabled: bool = True) -> QwenImageTransformer:
        """Run each block through ``mx.compile`` (fused element-wise work, one graph per block
        and input shape). Results equal the uncompiled model's; see
        ``scripts/bench_transformer.py --compile`` for what it gains on a device."""
        self.compiled = CompiledBlocks(enabled)
        return self

    # -- loading

    @classmethod
    def from_pretrained(
        cls, path: str | Path, plan: PrecisionPlan | str | None = None
    ) -> QwenImageTransformer:
        """Load a ``transformer/`` folder (converted, or a diffusers one converted in memory in
        float32). ``plan`` overrides the stored precision: a PrecisionPlan, or a name (fp32,
        bf16, fp16, mixed, auto, or a dtype for a uniform plan; see ``precision.make_plan``)."""
        config, weights = load_component(path)
        return cls.from_weights(config, weights, plan, where=str(path))

    @classmethod
    def from_weights(
        cls,
        config: dict,
        weights: dict[str, mx.array],
        plan: PrecisionPlan | str | None = None,
        where: str = "transformer",
        modulation: bool = True,
        quantize: int | None = None,
        group: mx.distributed.Group | None = None,
    ) -> QwenImageTransformer:
        """Build from a converted config and name->array weights (already in MLX naming).

        The weights are as the config's stored plan left them; a different ``plan`` is applied
        after loading (see ``apply_plan``): unfolded weights are folded for it, folded ones are
        refused unless ``plan`` has the very constants they were folded with. Quantized layers
        (``<name>.scales`` present) load as ``nn.QuantizedLinear``. ``modulation=False`` leaves
        out every sigma-only weight (see ``MODULATION_WEIGHTS``; the forward pass then needs
        precomputed ``modulation``, e.g. from ``qwen_mlx.adaln``): they are never read.
        ``quantize`` (4 or 8) quantizes float weights as they load, one block at a time, folded
        and cast for ``plan`` first: exactly what ``convert --quantize`` would have stored.
        """
        model = cls(TransformerConfig.from_dict(config))
        if not modulation:
            weights = {k: v for k, v in weights.items() if not MODULATION_WEIGHTS.match(k)}
            model.drop_modulation()
        stored = PrecisionPlan.from_config(config, model.config.num_layers)
        target = cls.target_plan(config, plan, where)
        if quantize:
            config, weights = cls.quantize_at_load(config, weights, stored, target, quantize)
            stored = target  # the weights are now folded and cast for it
        try:
            quantize_model(model, weights, group_size_of(config))
        except ValueError as e:
            raise CheckpointError(f"{where}: {e}") from e
        if group is not None and group.size() > 1:
            model.shard(group)
        load_weights(model, weights, where)
        model.plan = stored
        try:
            model.apply_plan(target)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
        return model

    @classmethod
    def target_plan(
        cls, config: dict, plan: PrecisionPlan | str | None = None, where: str = "transformer"
    ) -> PrecisionPlan:
        """The plan a model built from ``config`` runs under when asked for ``plan`` (a plan, a
        name, or None for the stored one), without loading anything."""
        n = TransformerConfig.from_dict(config).num_layers
        stored = PrecisionPlan.from_config(config, n)
        if isinstance(plan, str):
            variant = stored.variant or detect_variant(
                where if Path(where).exists() else None, config
            )
            plan = resolve_plan(plan, n, variant, float(config.get("eps", 1e-6)))
        return plan or stored

    @classmethod
    def quantize_at_load(
        cls,
        config: dict,
        weights: dict[str, mx.array],
        stored: PrecisionPlan,
        target: PrecisionPlan,
        bits: int,
    ) -> tuple[dict, dict[str, mx.array]]:
        """(config, weights) quantized at ``bits`` under the 4/8-bit plan, one block at a time.

        A checkpoint already quantized is returned as is (``bits`` must match its own).
        """
        qplan = transformer_plan(bits)
        if is_quantized(weights):
            have = config.get("quantization", {}).get("bits")
            if have != bits:
                raise ValueError(f"the checkpoint is already quantized ({have} bits), not {bits}")
            return config, weights
        if not stored.same_folds(target) and stored.folded:
            raise ValueError(
                f"the weights are folded for the {stored.name!r} plan; they cannot be quantized "
                f"for {target.name!r}"
            )
        fold = not stored.same_folds(target)
        n = TransformerConfig.from_dict(config).num_layers
        weights = quantize_stream(
            dict(weights),
            lambda path, shape: qplan.bits_for(path, shape, n),
            qplan.group_size,
            prepare=lambda name, w: planned_weight(name, w, target, fold),
        )
        skeleton = cls(TransformerConfig.from_dict(config))  # lazy init: lists the linears
        config = dict(config)
        config["quantization"] = quantization_config(qplan, linear_shapes(skeleton), n)
        return config, weights

    def apply_plan(self, plan: PrecisionPlan) -> None:
        """Store every weight in the dtype the plan gives it and set the plan's constants.

        The weights must be folded for ``plan``'s constants: a model whose weights carry no
        folded constants is folded here (in float32, before the cast); one folded for another
        plan is refused, since unfolding float16 weights would not give the original ones.
        """
        apply_precision_plan(self, plan, planned_weight, "checkpoint")

    def shard(self, group: mx.distributed.Group) -> QwenImageTransformer:
        """Tensor parallelism over ``group`` (in place; see ``qwen_mlx.distributed``)."""
        from qwen_mlx.distributed import shard_transformer

        shard_transformer(self, group)
        self.compiled = CompiledBlocks(self.compiled.enabled)  # new layers: retrace
        return self

    # -- modulation (sigma-only)

    @property
    def has_modulation(self) -> bool:
        return "linear" in self.norm_out

    def drop_modulation(self) -> None:
        """Remove every sigma-only layer: the model then runs from precomputed modulation."""
        for block in self.blocks:
            block.pop("img_mod", None)
            block.pop("txt_mod", None)
        self.norm_out.pop("linear", None)
        self.pop("time_embed", None)

    def modulation(self, timestep: mx.array) -> Modulation:
        """Every block's and the output norm's modulation for sigmas ``timestep`` (B,)."""
        if not self.has_modulation:
            raise ValueError(
                "this transformer was loaded without its modulation weights (adaLN cache): "
                "pass the precomputed modulation"
            )
        timestep = mx.array(timestep, dtype=F32).reshape(-1)
        temb_act = nn.silu(self.time_embed(timestep))
        zero = None
        if self.config.zero_cond_t:  # Edit-2511: reference-image tokens are modulated at t = 0
            zero_act = nn.silu(self.time_embed(mx.zeros_like(timestep)))
            zero = [run_linear(block.img_mod, zero_act) for block in self.blocks]
        return Modulation(
            [block.modulation(temb_act) for block in self.blocks],
            self.norm_out.modulation(temb_act),
            zero,
        )

    # -- forward

    def __call__(
        self,
        hidden_states: mx.array,
        encoder_hidden_states: mx.array,
        encoder_hidden_states_mask: mx.array | None,
        timestep: mx.array | None,
        img_shapes,
        modulation: Modulation | None = None,
        controlnet_block_samples: list[mx.array] | None = None,
        blocks_hook: BlocksHook | None = None,
    ) -> mx.array:
        """Predict the flow velocity for packed latents.

        hidden_states (B, L, in_channels), encoder_hidden_states (B, T, joint_attention_dim),
        encoder_hidden_states_mask (B, T) of 0/1 or None, timestep (B,) sigma in [0, 1],
        img_shapes a (frames, h, w) (or a list of them) per batch item. ``modulation``
        (precomputed, see ``modulation()``) replaces ``timestep``. ``controlnet_block_samples``:
        a ControlNet's residuals, added to the image stream after each block as diffusers does
        (block i takes residual i // ceil(num_layers / len(residuals))). ``blocks_hook(img, txt,
        run_blocks)`` (a step cache, ``qwen_mlx.step_cache``) runs the blocks in its stead and
        returns the image stream. Returns (B, L, out) float32 for all L image tokens.
        """
        cfg = self.config
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"hidden_states must be (B, L, {cfg.in_channels}), got {tuple(hidden_states.shape)}"
            )
        B, L, _ = hidden_states.shape
        if (
            encoder_hidden_states.ndim != 3
            or encoder_hidden_states.shape[0] != B
            or (encoder_hidden_states.shape[-1] != cfg.joint_attention_dim)
        ):
            raise ValueError(
                f"encoder_hidden_states must be ({B}, T, {cfg.joint_attention_dim}), "
                f"got {tuple(encoder_hidden_states.shape)}"
            )
        T = encoder_hidden_states.shape[1]
        shapes = _normalize_shapes(img_shapes, B)
        if sum(f * h * w for f, h, w in shapes) != L:
            raise ValueError(
                f"img_shapes {list(shapes)} describe a different token count than L={L}"
            )
        if modulation is None:
            if timestep is None:
                raise ValueError("pass a timestep or a precomputed modulation")
            timestep = mx.broadcast_to(mx.array(timestep, dtype=F32).reshape(-1), (B,))
            modulation = self.modulation(timestep)
        if len(modulation.blocks) != len(self.blocks):
            raise ValueError(
                f"modulation has {len(modulation.blocks)} blocks, model {len(self.blocks)}"
            )

        mask = None
        if encoder_hidden_states_mask is not None:
            if tuple(encoder_hidden_states_mask.shape) != (B, T):
                raise ValueError(
                    f"encoder_hidden_states_mask must be ({B}, {T}), "
                    f"got {tuple(encoder_hidden_states_mask.shape)}"
                )
            keys = mx.concatenate(
                [encoder_hidden_states_mask.astype(mx.bool_), mx.ones((B, L), dtype=mx.bool_)],
                axis=1,
            )
            mask = keys[:, None, None, :]

        rope = rope_tables(shapes, T, cfg.axes_dims_rope, cfg.rope_theta)
        img = run_linear(self.img_in, hidden_states).astype(F32)
        txt_normed = self.txt_norm(encoder_hidden_states.astype(self.txt_norm.weight.dtype))
        txt = run_linear(self.txt_in, txt_normed).astype(F32)
        if cfg.zero_cond_t and modulation.zero is None:
            raise ValueError("a zero_cond_t transformer needs the t = 0 modulation (.zero)")
        f, h, w = shapes[0]  # the noisy latents' tokens come first
        control = controlnet_block_samples or None
        interval = math.ceil(len(self.blocks) / len(control)) if control else 0

        def run_blocks(img, txt, start=0, stop=None, rows=None, attention=None):
            """Blocks [start, stop) on batch ``rows`` (an index array; all when None);
            ``attention(i, attn)`` gives block i's attention call when set."""
            m = mask if rows is None or mask is None else mask[rows]
            for i in range(start, len(self.blocks) if stop is None else stop):
                block, mod = self.blocks[i], _rows(modulation.blocks[i], rows)
                zero_cond = None
                if cfg.zero_cond_t:
                    zero_cond = (_rows(modulation.zero[i], rows), f * h * w)
                if attention is None:
                    img, txt = self.compiled(block)(img, txt, mod, m, rope, zero_cond)
                else:
                    img, txt = block(img, txt, mod, m, rope, zero_cond, attention(i, block.attn))
                if control:
                    img = img + _rows(control[i // interval], rows)
            return img, txt

        img = run_blocks(img, txt)[0] if blocks_hook is None else blocks_hook(img, txt, run_blocks)
        return run_linear(self.proj_out, self.norm_out(img, modulation.out)).astype(F32)


def apply_precision_plan(model, plan: PrecisionPlan, weight: Callable, what: str) -> None:
    """``model.apply_plan(plan)`` for a model of blocks (the transformer, the ControlNet):
    every float weight through ``weight(name, w, plan, fold)`` (folded and cast), the plan's
    constants set on each block, the compiled blocks retraced. ``what`` names the original
    files in the refusals ("checkpoint", "ControlNet")."""
    if len(plan.layers) != model.config.num_layers:
        raise ValueError(f"plan has {len(plan.layers)} layers, model {model.config.num_layers}")
    refold = not model.plan.same_folds(plan)
    if refold and model.plan.folded:
        raise ValueError(
            f"the weights are folded for the {model.plan.name!r} precision plan "
            f"({model.plan.variant or 'unknown variant'}) and only run with its constants; "
            f"load them with plan={model.plan.name!r} (or no plan), or convert the original "
            f"{what} again for {plan.name!r}"
        )
    # Only floating arrays are folded and cast: packed quantized weights pass through (their
    # scales and biases are floating and follow the plan, which sets the compute dtype).
    params = [(k, v) for k, v in tree_flatten(model.parameters()) if is_float(v)]
    if refold and any(k.endswith(".scales") for k, _ in params):
        raise ValueError(
            f"quantized weights cannot be folded for another precision plan; quantize the "
            f"{what} under {plan.name!r} instead (convert with --precision {plan.name} and "
            "--quantize together)"
        )
    changed = []
    for k, v in params:
        new = weight(k, v, plan, refold)
        if new is not v:
            changed.append((k, new))
    if changed:
        model.update(tree_unflatten(changed))
    for block, layer in zip(model.blocks, plan.layers, strict=True):
        for norm in (
            block.attn.norm_q,
            block.attn.norm_k,
            block.attn.norm_added_q,
            block.attn.norm_added_k,
        ):
            norm.eps = layer.qk_norm_eps
        block.img_mlp.in_scale = block.txt_mlp.in_scale = layer.ffn_in_scale
    model.plan = plan
    model.compiled = CompiledBlocks(model.compiled.enabled)  # constants changed: retrace


def planned_weight(name: str, w: mx.array, plan: PrecisionPlan, fold: bool) -> mx.array:
    """``w`` folded for ``plan`` (if ``fold``; in float32) and cast to the dtype ``plan`` gives
    it; ``w`` itself when nothing changes. Non-float arrays (packed quantized weights) pass."""
    if not mx.issubdtype(w.dtype, mx.floating):
        return w
    new, folded = fold_weight(name, w, plan) if fold else (w, False)
    dtype = plan_dtype(plan, name)
    return new.astype(dtype) if folded or new.dtype != dtype else w
