"""Per-layer precision plans for the transformer.

One mechanism, driven by data:

* the residual streams (image and text) are always float32;
* every linear computes in the dtype its weights are stored in (its input is cast to that dtype
  and its output cast back to float32 before it touches a residual);
* a plan says, per block, which dtype each group of weights is stored in, the q/k RMSNorm eps
  (which absorbs a folded q/k/v input scale), and any run-time FFN-input scale.

The converter uses the same plan to store (and fold) weights; ``apply_plan`` casts a loaded model
to it, so a float32 checkpoint can run under a bf16 plan without re-converting.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import mlx.core as mx

DTYPES: dict[str, mx.Dtype] = {
    "float32": mx.float32,
    "bfloat16": mx.bfloat16,
    "float16": mx.float16,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# The weight groups of a block a plan can place in different dtypes.
BLOCK_GROUPS = ("mod", "qkv", "v", "attn_out", "ffn_up", "ffn_down")


@dataclass(frozen=True)
class LayerPrecision:
    """How one transformer block stores its weights and computes."""

    dtypes: dict[str, str] = field(default_factory=dict)  # group -> dtype name
    default: str = "float32"
    qk_norm_eps: float = 1e-6
    ffn_in_scale: float = 1.0  # FFN input computed / scale, undone in float32 before the GELU

    def dtype(self, group: str) -> mx.Dtype:
        return DTYPES[self.dtypes.get(group, self.default)]

    def to_dict(self) -> dict:
        return {
            "dtypes": dict(self.dtypes),
            "default": self.default,
            "qk_norm_eps": self.qk_norm_eps,
            "ffn_in_scale": self.ffn_in_scale,
        }

    @classmethod
    def from_dict(cls, d: dict) -> LayerPrecision:
        return cls(
            dtypes=dict(d.get("dtypes", {})),
            default=d.get("default", "float32"),
            qk_norm_eps=float(d.get("qk_norm_eps", 1e-6)),
            ffn_in_scale=float(d.get("ffn_in_scale", 1.0)),
        )


@dataclass(frozen=True)
class PrecisionPlan:
    """A transformer's precision: one LayerPrecision per block plus the dtype of the rest."""

    name: str
    layers: tuple[LayerPrecision, ...]
    outer: str = "float32"  # embedders, txt_norm, norm_out, proj_out

    @classmethod
    def uniform(cls, dtype: str, num_layers: int, eps: float = 1e-6) -> PrecisionPlan:
        if dtype not in DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; choose one of {sorted(DTYPES)}")
        layer = LayerPrecision(default=dtype, qk_norm_eps=eps)
        return cls(name=dtype, layers=(layer,) * num_layers, outer=dtype)

    def layer(self, i: int) -> LayerPrecision:
        return self.layers[i]

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "outer": self.outer,
            "layers": [layer.to_dict() for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, d: dict) -> PrecisionPlan:
        return cls(
            name=d["name"],
            outer=d.get("outer", "float32"),
            layers=tuple(LayerPrecision.from_dict(x) for x in d["layers"]),
        )

    @classmethod
    def from_config(cls, config: dict, num_layers: int) -> PrecisionPlan:
        """The plan a converted checkpoint was written with (uniform in its dtype if none)."""
        section = config.get("qwen_mlx", {})
        if "precision_plan" in section:
            plan = cls.from_dict(section["precision_plan"])
            if len(plan.layers) != num_layers:
                raise ValueError(
                    f"precision plan has {len(plan.layers)} layers, model has {num_layers}"
                )
            return plan
        return cls.uniform(section.get("dtype", "float32"), num_layers)


def compute_dtype(layer) -> mx.Dtype:
    """The dtype a linear computes in: its weights' (its scales' when quantized)."""
    scales = getattr(layer, "scales", None)
    return scales.dtype if scales is not None else layer.weight.dtype


def run_linear(layer, x: mx.array) -> mx.array:
    """Apply a linear in its own compute dtype."""
    return layer(x.astype(compute_dtype(layer)))


# Which plan group each transformer weight belongs to, by its MLX name. Order matters.
_GROUP_RULES: tuple[tuple[re.Pattern, str], ...] = tuple(
    (re.compile(p), g)
    for p, g in (
        (r"^blocks\.(\d+)\.(img|txt)_mod\.", "mod"),
        (r"^blocks\.(\d+)\.attn\.(to_v|add_v_proj)\.", "v"),
        (r"^blocks\.(\d+)\.attn\.(to_out|to_add_out)\.", "attn_out"),
        (r"^blocks\.(\d+)\.attn\.", "qkv"),
        (r"^blocks\.(\d+)\.(img|txt)_mlp\.up\.", "ffn_up"),
        (r"^blocks\.(\d+)\.(img|txt)_mlp\.down\.", "ffn_down"),
    )
)


def weight_group(name: str) -> tuple[int | None, str]:
    """(block index, group) of a transformer weight; (None, "outer") outside the blocks."""
    for pattern, group in _GROUP_RULES:
        m = pattern.match(name)
        if m:
            return int(m.group(1)), group
    return None, "outer"


def plan_dtype(plan: PrecisionPlan, name: str) -> mx.Dtype:
    """The dtype ``plan`` stores the transformer weight ``name`` in."""
    layer, group = weight_group(name)
    if layer is None:
        return DTYPES[plan.outer]
    return plan.layer(layer).dtype(group)
