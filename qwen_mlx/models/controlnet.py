"""The Qwen-Image ControlNet (InstantX Union and Inpainting), as diffusers'
``QwenImageControlNetModel``.

A shallow copy of the transformer's input side and first blocks: the packed noisy latents go
through ``img_in`` plus ``controlnet_x_embedder(control latents)``, then ``num_layers`` dual-stream
blocks (the transformer's own ``TransformerBlock``); after each block a zero-initialised
``controlnet_blocks[i]`` linear projects the image stream into a residual that the transformer
adds after its blocks (``QwenImageTransformer.__call__(..., controlnet_block_samples=...)``,
block ``j`` takes residual ``j // ceil(num_transformer_layers / num_residuals)``).

The Inpainting ControlNet differs only in ``extra_condition_channels`` (4: a packed 2x2 mask
channel after the 64 packed latent channels of the masked image).

Precision: the blocks run under a ``PrecisionPlan`` exactly as the transformer's do (same groups,
same folds). The residual projections are treated as the most exposed FFN down-projection (the
last block's): stored in that group's dtype, and under a folded (fp16) plan computed on
``x / c`` with ``c`` = the last block's FFN-out scale, bias folded x 1/c, and scaled back by
``c * conditioning_scale`` in float32 (see ``residual_scale``), so the residuals enter the
transformer's float32 stream at their true scale and no float16 tensor holds the unscaled
stream.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from qwen_mlx.config import ComponentConfig
from qwen_mlx.dtypes import is_float
from qwen_mlx.errors import CheckpointError
from qwen_mlx.loading import load_component, load_weights
from qwen_mlx.models.transformer import (
    CompiledBlocks,
    TimestepEmbedder,
    TransformerBlock,
    TransformerConfig,
    _normalize_shapes,
    apply_precision_plan,
    rope_tables,
)
from qwen_mlx.precision import PrecisionPlan, fold_weight, plan_dtype, resolve_plan, run_linear
from qwen_mlx.quantize import (
    TRANSFORMER_KEEP,
    QuantizationPlan,
    group_size_of,
    quantize_model,
    quantize_stream,
    transformer_plan,
)

F32 = mx.float32
CLASS_NAME = "QwenImageControlNetModel"

# The sigma-only weights (what an adaLN table precomputes).
MODULATION_WEIGHTS = re.compile(r"^(time_embed|blocks\.\d+\.(img|txt)_mod)\.")
_RESIDUAL = re.compile(r"^controlnet_blocks\.\d+\.(weight|bias)$")


def is_controlnet_config(config: dict) -> bool:
    """True for a ``QwenImageControlNetModel`` config.json (the class name diffusers writes)."""
    return config.get("_class_name") == CLASS_NAME


@dataclass
class ControlNetConfig(ComponentConfig):
    patch_size: int = 2
    in_channels: int = 64
    out_channels: int | None = 16
    num_layers: int = 60  # diffusers' default; the InstantX ControlNets have 5 (6 for Inpainting)
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    extra_condition_channels: int = 0
    rope_theta: float = 10000.0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        self.axes_dims_rope = tuple(self.axes_dims_rope)
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim "
                f"{self.attention_head_dim}"
            )
        if self.extra_condition_channels < 0:
            raise ValueError("extra_condition_channels must be >= 0")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def condition_channels(self) -> int:
        """Width of the packed control input: latents (+ the mask for the Inpainting model)."""
        return self.in_channels + self.extra_condition_channels

    @property
    def inpainting(self) -> bool:
        return self.extra_condition_channels > 0

    def block_config(self) -> TransformerConfig:
        return TransformerConfig(
            patch_size=self.patch_size,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            num_layers=self.num_layers,
            attention_head_dim=self.attention_head_dim,
            num_attention_heads=self.num_attention_heads,
            joint_attention_dim=self.joint_attention_dim,
            axes_dims_rope=self.axes_dims_rope,
            rope_theta=self.rope_theta,
            eps=self.eps,
        )


def check_compatible(controlnet: dict, transformer: dict, where: str = "controlnet") -> None:
    """Refuse a ControlNet whose widths differ from the transformer's (one line, no loading)."""
    cn = ControlNetConfig.from_dict(controlnet)
    tr = TransformerConfig.from_dict(transformer)
    for what, a, b in (
        ("inner width (heads x head dim)", cn.inner_dim, tr.inner_dim),
        ("in_channels", cn.in_channels, tr.in_channels),
        ("joint_attention_dim", cn.joint_attention_dim, tr.joint_attention_dim),
        ("axes_dims_rope", cn.axes_dims_rope, tr.axes_dims_rope),
    ):
        if a != b:
            raise CheckpointError(
                f"{where}: its {what} is {a}, the transformer's is {b}: this ControlNet was not "
                "trained for this model"
            )


# ----------------------------------------------------------------------------- precision


def residual_scale(plan: PrecisionPlan) -> float:
    """The power of two the residual projections compute under (1 unless the plan folds)."""
    return plan.layers[-1].ffn_out_scale if plan.layers else 1.0


def residual_dtype(plan: PrecisionPlan) -> mx.Dtype:
    """The residual projections' dtype: the last block's FFN down-projection's."""
    return plan.layers[-1].dtype("ffn_down")


def fold_controlnet_weight(name: str, w: mx.array, plan: PrecisionPlan) -> tuple[mx.array, bool]:
    """``fold_weight`` for a ControlNet weight (float32 result; whether it changed): the blocks
    as the transformer's, the residual projections' bias x 1/c (``residual_scale``)."""
    if not _RESIDUAL.match(name):
        return fold_weight(name, w, plan)
    c = residual_scale(plan)
    if c == 1.0 or not name.endswith(".bias"):
        return w, False
    return w.astype(F32) * (1.0 / c), True


def controlnet_dtype(plan: PrecisionPlan, name: str) -> mx.Dtype:
    """The dtype ``plan`` stores the ControlNet weight ``name`` in."""
    return residual_dtype(plan) if _RESIDUAL.match(name) else plan_dtype(plan, name)


def controlnet_weight(name: str, w: mx.array, plan: PrecisionPlan, fold: bool) -> mx.array:
    """``planned_weight`` for a ControlNet weight: folded for ``plan`` (if ``fold``) and cast to
    its dtype; ``w`` itself when nothing changes. Packed quantized weights pass."""
    if not is_float(w):
        return w
    new, folded = fold_controlnet_weight(name, w, plan) if fold else (w, False)
    dtype = controlnet_dtype(plan, name)
    return new.astype(dtype) if folded or new.dtype != dtype else w


def quantization_plan(bits: int, group_size: int = 64) -> QuantizationPlan:
    """The transformer's plan, keeping the ControlNet's input embedder and residual projections
    in float (0.05 % of the weights; their outputs go straight into the transformer)."""
    base = transformer_plan(bits, group_size)
    keep = (*TRANSFORMER_KEEP, r"^controlnet_(blocks\.\d+|x_embedder)$")
    return QuantizationPlan(bits, group_size, keep, base.rules, base.edge_blocks, base.edge_bits)


# ----------------------------------------------------------------------------- model


class QwenImageControlNet(nn.Module):
    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = cfg = config
        dim = cfg.inner_dim
        block_cfg = cfg.block_config()
        self.time_embed = TimestepEmbedder(dim)
        self.txt_norm = nn.RMSNorm(cfg.joint_attention_dim, eps=1e-6)
        self.img_in = nn.Linear(cfg.in_channels, dim)
        self.txt_in = nn.Linear(cfg.joint_attention_dim, dim)
        self.blocks = [TransformerBlock(block_cfg) for _ in range(cfg.num_layers)]
        self.controlnet_blocks = [nn.Linear(dim, dim) for _ in range(cfg.num_layers)]
        self.controlnet_x_embedder = nn.Linear(cfg.condition_channels, dim)
        self.plan = PrecisionPlan.uniform("float32", cfg.num_layers)
        self.compiled = CompiledBlocks()

    def compile(self, enabled: bool = True) -> QwenImageControlNet:
        self.compiled = CompiledBlocks(enabled)
        return self

    # -- loading

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        plan: PrecisionPlan | str | None = None,
        variant: str | None = None,
    ) -> QwenImageControlNet:
        """Load a ControlNet folder (converted, or diffusers' layout converted in memory in
        float32). ``plan``: a PrecisionPlan or a name (``variant`` picks the fp16 table)."""
        config, weights = load_component(path)
        return cls.from_weights(config, weights, plan, variant, where=str(path))

    @classmethod
    def from_weights(
        cls,
        config: dict,
        weights: dict[str, mx.array],
        plan: PrecisionPlan | str | None = None,
        variant: str | None = None,
        where: str = "controlnet",
        modulation: bool = True,
        quantize: int | None = None,
    ) -> QwenImageControlNet:
        """Build from a converted config and MLX-named weights, then apply ``plan`` (folding
        unfolded weights for it; weights folded for another plan are refused). ``quantize``
        (4 or 8): quantize float weights as they load, folded and cast for ``plan`` first
        (what ``convert --quantize`` writes); a quantized checkpoint loads as it is."""
        model = cls(ControlNetConfig.from_dict(config))
        n = model.config.num_layers
        if not modulation:
            weights = {k: v for k, v in weights.items() if not MODULATION_WEIGHTS.match(k)}
            model.drop_modulation()
        stored = PrecisionPlan.from_config(config, n)
        if isinstance(plan, str):
            variant = stored.variant or variant or config.get("qwen_mlx", {}).get("variant")
            plan = resolve_plan(plan, n, variant, model.config.eps)
        if quantize and not any(k.endswith(".scales") for k in weights):
            target = plan or stored
            if stored.folded and not stored.same_folds(target):
                raise ValueError(
                    f"{where}: folded for {stored.name!r}, cannot quantize for another"
                )
            fold = not stored.same_folds(target)
            qplan = quantization_plan(quantize, group_size_of(config))
            weights = quantize_stream(
                dict(weights),
                lambda path, shape: qplan.bits_for(path, shape, n),
                qplan.group_size,
                prepare=lambda name, w: controlnet_weight(name, w, target, fold),
            )
            config = {**config, "quantization": {"group_size": qplan.group_size}}
            stored = target
        try:
            quantize_model(model, weights, group_size_of(config))
        except ValueError as e:
            raise CheckpointError(f"{where}: {e}") from e
        load_weights(model, weights, where)
        model.plan = stored
        try:
            model.apply_plan(plan or stored)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
        return model

    def apply_plan(self, plan: PrecisionPlan) -> None:
        """As ``QwenImageTransformer.apply_plan``, with the residual projections' rule."""
        apply_precision_plan(self, plan, controlnet_weight, "ControlNet")

    # -- modulation (sigma-only)

    @property
    def has_modulation(self) -> bool:
        return "time_embed" in self

    def drop_modulation(self) -> None:
        for block in self.blocks:
            block.pop("img_mod", None)
            block.pop("txt_mod", None)
        self.pop("time_embed", None)

    def modulation(self, timestep: mx.array) -> list[tuple[mx.array, mx.array]]:
        """Each block's (img_mod, txt_mod) output for sigmas ``timestep`` (B,)."""
        if not self.has_modulation:
            raise ValueError("this ControlNet was loaded without its modulation weights")
        timestep = mx.array(timestep, dtype=F32).reshape(-1)
        temb_act = nn.silu(self.time_embed(timestep))
        return [block.modulation(temb_act) for block in self.blocks]

    # -- forward

    def __call__(
        self,
        hidden_states: mx.array,
        controlnet_cond: mx.array,
        conditioning_scale: float,
        encoder_hidden_states: mx.array,
        encoder_hidden_states_mask: mx.array | None,
        timestep: mx.array | None,
        img_shapes,
        modulation: list[tuple[mx.array, mx.array]] | None = None,
    ) -> list[mx.array]:
        """The residuals (one per block, (B, L, dim) float32, already x ``conditioning_scale``).

        hidden_states (B, L, in_channels) packed noisy latents; controlnet_cond (B, L,
        in_channels + extra_condition_channels) packed control latents; the rest as the
        transformer takes them (``modulation`` precomputed replaces ``timestep``).
        """
        cfg = self.config
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"hidden_states must be (B, L, {cfg.in_channels}), got {tuple(hidden_states.shape)}"
            )
        B, L, _ = hidden_states.shape
        if tuple(controlnet_cond.shape) != (B, L, cfg.condition_channels):
            raise ValueError(
                f"controlnet_cond must be ({B}, {L}, {cfg.condition_channels}), "
                f"got {tuple(controlnet_cond.shape)}"
            )
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != B:
            raise ValueError(
                f"encoder_hidden_states must be ({B}, T, {cfg.joint_attention_dim}), "
                f"got {tuple(encoder_hidden_states.shape)}"
            )
        T = encoder_hidden_states.shape[1]
        shapes = _normalize_shapes(img_shapes, B)
        if sum(f * h * w for f, h, w in shapes) != L:
            raise ValueError(f"img_shapes {list(shapes)} describe a different token count than {L}")
        if modulation is None:
            if timestep is None:
                raise ValueError("pass a timestep or a precomputed modulation")
            timestep = mx.broadcast_to(mx.array(timestep, dtype=F32).reshape(-1), (B,))
            modulation = self.modulation(timestep)
        if len(modulation) != len(self.blocks):
            raise ValueError(f"modulation has {len(modulation)} blocks, model {len(self.blocks)}")

        mask = None
        if encoder_hidden_states_mask is not None:
            keys = mx.concatenate(
                [encoder_hidden_states_mask.astype(mx.bool_), mx.ones((B, L), dtype=mx.bool_)],
                axis=1,
            )
            mask = keys[:, None, None, :]
        rope = rope_tables(shapes, T, cfg.axes_dims_rope, cfg.rope_theta)
        img = run_linear(self.img_in, hidden_states).astype(F32)
        img = img + run_linear(self.controlnet_x_embedder, controlnet_cond).astype(F32)
        txt_normed = self.txt_norm(encoder_hidden_states.astype(self.txt_norm.weight.dtype))
        txt = run_linear(self.txt_in, txt_normed).astype(F32)

        c = residual_scale(self.plan)
        out_scale = c * float(conditioning_scale)
        residuals = []
        for block, proj, mod in zip(self.blocks, self.controlnet_blocks, modulation, strict=True):
            img, txt = self.compiled(block)(img, txt, mod, mask, rope, None)
            x = img if c == 1.0 else img * (1.0 / c)
            residuals.append(run_linear(proj, x).astype(F32) * out_scale)
        return residuals


# ----------------------------------------------------------------------------- adaLN table


def modulation_table(
    folder: str | Path,
    plan: PrecisionPlan,
    timesteps,
    quantize: int | None = None,
    cache=None,
):
    """The ControlNet's per-step modulation (``table[i].blocks``: each block's (img_mod,
    txt_mod) at step i) for ``timesteps`` under ``plan``, from the adaLN cache or streamed
    from the folder now (converted or not), exactly as the model computes it live."""
    from qwen_mlx.adaln import AdaLNCache, cache_key, compute_modulation, weights_identity
    from qwen_mlx.io import is_converted

    folder = Path(folder)
    config, weights = load_component(folder)  # lazy
    cfg = ControlNetConfig.from_dict(config)
    extra = {"component": "controlnet", "converted": is_converted(folder), "quantize": quantize}
    key = cache_key(weights_identity(folder), plan, timesteps, "", extra)

    def build():
        stored = PrecisionPlan.from_config(config, cfg.num_layers)
        mods = {k: v for k, v in weights.items() if MODULATION_WEIGHTS.match(k)}
        quant = quantization_plan(quantize) if quantize else None
        return compute_modulation(
            cfg.block_config(), mods, stored, plan, timesteps, group_size_of(config), quant
        )

    return (cache or AdaLNCache()).get(key, build)


# ----------------------------------------------------------------------------- memory


def weight_bytes(
    folder: str | Path, plan: PrecisionPlan, adaln_cache: bool, quantize: int | None = None
) -> int:
    """Bytes the ControlNet of ``folder`` occupies once loaded under ``plan`` (headers only):
    without its modulation under the adaLN cache, quantized at load if ``quantize``."""
    from qwen_mlx.io import folder_tensors, is_converted
    from qwen_mlx.memory import FLOAT_DTYPES
    from qwen_mlx.memory import weight_bytes as count
    from qwen_mlx.naming import TRANSFORMER_RULES, rename

    folder = Path(folder)
    converted = is_converted(folder)
    tensors = {
        (k if converted else rename(k, TRANSFORMER_RULES)): v
        for k, v in folder_tensors(folder).items()
    }
    if adaln_cache:
        tensors = {k: v for k, v in tensors.items() if not MODULATION_WEIGHTS.match(k)}
    bits_of = None
    already = any(v.dtype not in FLOAT_DTYPES for v in tensors.values())
    if quantize and not already:
        qplan = quantization_plan(quantize)
        n = len({k.split(".")[1] for k in tensors if k.startswith("blocks.")})

        def bits_of(name, info):
            return qplan.bits_for(name.rsplit(".", 1)[0], info.shape, n)

    return count(tensors, lambda name: controlnet_dtype(plan, name).size, None, 64, bits_of)


def residual_bytes(
    config: dict, width: int, height: int, scale: int, batch: int = 1, cfg: bool = True
) -> int:
    """The residuals one step holds (float32, one per block, doubled under true CFG)."""
    cfg_ = ControlNetConfig.from_dict(config)
    tokens = (height // scale // 2) * (width // scale // 2)
    rows = batch * (2 if cfg else 1) + batch  # the CFG copy and the ControlNet's own
    return cfg_.num_layers * rows * tokens * cfg_.inner_dim * 4
