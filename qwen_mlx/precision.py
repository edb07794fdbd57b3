"""Per-layer precision plans for the transformer.

One mechanism, driven by data:

* the residual streams (image and text) are always float32;
* every linear computes in the dtype its weights are stored in (its input is cast to that dtype
  and its output cast back to float32 before it touches a residual);
* a plan says, per block, which dtype each group of weights is stored in, the constants folded
  into its weights (q/k/v input, attention-output and FFN-output scales), the q/k RMSNorm eps
  (which absorbs the q/k/v input scale), and any run-time FFN-input scale.

The converter uses the same plan to store (and fold) weights; ``apply_plan`` casts a loaded model
to it (folding an unfolded model on the way), so a float32 checkpoint can run under a bf16 or an
fp16 plan without re-converting.

Plans by name (``make_plan``):

* ``fp32`` / ``bf16``: every weight in that dtype, nothing folded;
* ``fp16``: every weight in float16, each branch computed in a down-scaled domain (the scales of
  the variant's row in ``SCALES``) and scaled back up in float32, so the residual stream may grow
  far past 65504 (Qwen-Image's reaches ~2e7) without any float16 tensor overflowing;
* ``mixed``: float16 for most weights, bfloat16 (range of float32) without scaling for the
  overflow-critical groups (v, attention out-projections, FFN down-projections);
* ``float32`` / ``bfloat16`` / ``float16``: uniform plans by dtype name (``float16`` is plain
  float16 with no scaling: it overflows on the released models and is there for comparison).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

import mlx.core as mx

from qwen_mlx.device import auto_precision
from qwen_mlx.dtypes import DTYPES, dtype_of
from qwen_mlx.errors import RequestError
from qwen_mlx.variants import DEFAULT_VARIANT, VARIANTS, normalize_variant

# The weight groups of a block a plan can place in different dtypes.
BLOCK_GROUPS = ("mod", "qkv", "v", "attn_out", "ffn_up", "ffn_down")

# Plan names make_plan understands (besides the dtype names and "auto").
PLAN_NAMES = ("fp32", "bf16", "fp16", "mixed")
# The groups whose outputs overflow float16 on the released models (docs/precision.md).
OVERFLOW_GROUPS = ("v", "attn_out", "ffn_down")


# ----------------------------------------------------------------------------- scale tables


@dataclass(frozen=True)
class VariantScales:
    """The FP16 plan's constants for one model variant (powers of two: folding is exact).

    ``attn_out`` and ``ffn_out`` are (early, late); the late value applies to the last
    ``attn_late`` / ``ffn_late`` blocks (layers 44-59 and 59 of the 60-layer model), counted from
    the last block so that shallower models get the same treatment.
    """

    qkv_in: float  # q/k/v input divided by this (folded into mod1 shift/scale, q/k/v biases)
    attn_out: tuple[float, float]  # attention output divided by this (folded into v, out bias)
    ffn_out: tuple[float, float]  # FFN output divided by this (folded into the down-projection)
    ffn_in: float = 1.0  # FFN input divided by this in float16, undone in float32 before GELU
    attn_late: int = 16
    ffn_late: int = 1

    def attn_scale(self, layer: int, num_layers: int) -> float:
        return self.attn_out[1] if layer >= num_layers - self.attn_late else self.attn_out[0]

    def ffn_scale(self, layer: int, num_layers: int) -> float:
        return self.ffn_out[1] if layer >= num_layers - self.ffn_late else self.ffn_out[0]


_EDIT_PLUS = VariantScales(qkv_in=8, attn_out=(4, 32), ffn_out=(32, 512))
SCALES: dict[str, VariantScales] = {  # one row per qwen_mlx.variants.VARIANTS
    "qwen-image": VariantScales(qkv_in=8, attn_out=(2, 16), ffn_out=(16, 256)),
    "qwen-image-edit": VariantScales(qkv_in=8, attn_out=(2, 16), ffn_out=(32, 512)),
    "qwen-image-edit-2509": _EDIT_PLUS,
    "qwen-image-edit-2511": _EDIT_PLUS,
    "qwen-image-2512": VariantScales(qkv_in=16, attn_out=(4, 32), ffn_out=(32, 512), ffn_in=2),
}
assert tuple(SCALES) == VARIANTS, "every variant needs its scale row"


# ----------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class LayerPrecision:
    """How one transformer block stores its weights and computes.

    The scales are folded into the weights (see ``fold_weight``) except ``ffn_in_scale``, whose
    bias part is folded and whose input part is a run-time multiply (GELU is not linear).
    """

    dtypes: dict[str, str] = field(default_factory=dict)  # group -> dtype name
    default: str = "float32"
    qk_norm_eps: float = 1e-6
    ffn_in_scale: float = 1.0  # FFN input computed / scale, undone in float32 before the GELU
    qkv_scale: float = 1.0  # q/k/v input / s
    attn_out_scale: float = 1.0  # attention output / p
    ffn_out_scale: float = 1.0  # FFN output / f

    def dtype(self, group: str) -> mx.Dtype:
        return dtype_of(self.dtypes.get(group, self.default))

    @property
    def folds(self) -> tuple[float, float, float, float]:
        """The constants baked into this block's weights: (s, p, f, FFN input)."""
        return (self.qkv_scale, self.attn_out_scale, self.ffn_out_scale, self.ffn_in_scale)

    @property
    def folded(self) -> bool:
        return self.folds != (1.0, 1.0, 1.0, 1.0)

    def to_dict(self) -> dict:
        return {
            "dtypes": dict(self.dtypes),
            "default": self.default,
            "qk_norm_eps": self.qk_norm_eps,
            "ffn_in_scale": self.ffn_in_scale,
            "qkv_scale": self.qkv_scale,
            "attn_out_scale": self.attn_out_scale,
            "ffn_out_scale": self.ffn_out_scale,
        }

    @classmethod
    def from_dict(cls, d: dict) -> LayerPrecision:
        return cls(
            dtypes=dict(d.get("dtypes", {})),
            default=d.get("default", "float32"),
            qk_norm_eps=float(d.get("qk_norm_eps", 1e-6)),
            ffn_in_scale=float(d.get("ffn_in_scale", 1.0)),
            qkv_scale=float(d.get("qkv_scale", 1.0)),
            attn_out_scale=float(d.get("attn_out_scale", 1.0)),
            ffn_out_scale=float(d.get("ffn_out_scale", 1.0)),
        )


@dataclass(frozen=True)
class PrecisionPlan:
    """A transformer's precision: one LayerPrecision per block plus the dtype of the rest."""

    name: str
    layers: tuple[LayerPrecision, ...]
    outer: str = "float32"  # embedders, txt_norm, norm_out, proj_out
    variant: str | None = None  # the model variant whose scale table the plan uses

    @classmethod
    def uniform(cls, dtype: str, num_layers: int, eps: float = 1e-6) -> PrecisionPlan:
        dtype_of(dtype)  # validates the name
        layer = LayerPrecision(default=dtype, qk_norm_eps=eps)
        return cls(name=dtype, layers=(layer,) * num_layers, outer=dtype)

    def layer(self, i: int) -> LayerPrecision:
        return self.layers[i]

    @property
    def folded(self) -> bool:
        """True when the plan bakes constants into the weights."""
        return any(layer.folded for layer in self.layers)

    def same_folds(self, other: PrecisionPlan) -> bool:
        """True when weights folded for ``self`` are exactly right for ``other`` too."""
        return len(self.layers) == len(other.layers) and all(
            all(math.isclose(x, y, rel_tol=1e-12) for x, y in zip(a.folds, b.folds, strict=True))
            for a, b in zip(self.layers, other.layers, strict=True)
        )

    def with_dtype(self, dtype: str) -> PrecisionPlan:
        """The same plan (same constants) with every weight in ``dtype``: e.g. float32, to check
        that folding is exact or to keep a full-precision master copy."""
        dtype_of(dtype)  # validates the name
        layers = tuple(replace(layer, dtypes={}, default=dtype) for layer in self.layers)
        return replace(self, layers=layers, outer=dtype)

    def storage_dtype(self) -> str:
        """The one dtype every weight is stored in, or "mixed"."""
        names = {self.outer}
        for layer in self.layers:
            names.update(layer.dtypes.get(g, layer.default) for g in BLOCK_GROUPS)
        return names.pop() if len(names) == 1 else "mixed"

    def describe(self) -> str:
        """One line for ``qwen-mlx info`` and logs."""
        text = f"{self.name} (weights {self.storage_dtype()}"
        if self.variant:
            text += f", variant {self.variant}"
        if self.folded:
            first, last = self.layers[0], self.layers[-1]

            def span(a: float, b: float) -> str:
                return f"/{a:g}" if a == b else f"/{a:g} to /{b:g}"

            parts = [
                (first.qkv_scale, last.qkv_scale, "q/k/v input"),
                (first.attn_out_scale, last.attn_out_scale, "attention out"),
                (first.ffn_in_scale, last.ffn_in_scale, "FFN in"),
                (first.ffn_out_scale, last.ffn_out_scale, "FFN out"),
            ]
            folded = [f"{what} {span(a, b)}" for a, b, what in parts if (a, b) != (1, 1)]
            text += "; folded " + ", ".join(folded)
        return text + ")"

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "variant": self.variant,
            "outer": self.outer,
            "layers": [layer.to_dict() for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, d: dict) -> PrecisionPlan:
        return cls(
            name=d["name"],
            outer=d.get("outer", "float32"),
            layers=tuple(LayerPrecision.from_dict(x) for x in d["layers"]),
            variant=d.get("variant"),
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


def make_plan(
    name: str, variant: str | None = None, num_layers: int = 60, eps: float = 1e-6
) -> PrecisionPlan:
    """A named plan for a model of ``num_layers`` blocks.

    ``name``: fp32, bf16, fp16, mixed, a dtype name (float32, bfloat16, float16: uniform), or
    auto (``auto_precision()`` for this machine). ``variant`` picks the fp16 scale table (see
    ``SCALES``; default qwen-image); ``eps`` is the model's q/k RMSNorm eps.
    """
    variant = normalize_variant(variant) if variant else None
    if name == "auto":
        name = auto_precision()[0]
    if name in DTYPES:
        return replace(PrecisionPlan.uniform(name, num_layers, eps), variant=variant)
    if name in ("fp32", "bf16"):
        dtype = "float32" if name == "fp32" else "bfloat16"
        return replace(PrecisionPlan.uniform(dtype, num_layers, eps), name=name, variant=variant)
    if name not in PLAN_NAMES:
        raise RequestError(
            f"unknown precision {name!r}; choose one of {', '.join(PLAN_NAMES)}, auto, "
            f"or a dtype ({', '.join(DTYPES)})"
        )
    variant = variant or DEFAULT_VARIANT  # the scaled plans always name their table
    table = SCALES[variant]
    layers = []
    for i in range(num_layers):
        if name == "fp16":
            s = float(table.qkv_in)
            layers.append(
                LayerPrecision(
                    default="float16",
                    qk_norm_eps=eps / (s * s),  # q, k come out of their RMSNorm exact
                    ffn_in_scale=float(table.ffn_in),
                    qkv_scale=s,
                    attn_out_scale=float(table.attn_scale(i, num_layers)),
                    ffn_out_scale=float(table.ffn_scale(i, num_layers)),
                )
            )
        else:  # mixed: no scaling where bf16 takes the range; the fp16 up-projection keeps its
            # input scale (2512), which costs one multiply and folds exactly.
            layers.append(
                LayerPrecision(
                    dtypes={g: "bfloat16" for g in OVERFLOW_GROUPS},
                    default="float16",
                    qk_norm_eps=eps,
                    ffn_in_scale=float(table.ffn_in),
                )
            )
    return PrecisionPlan(name=name, layers=tuple(layers), outer="float16", variant=variant)


def resolve_plan(
    plan: PrecisionPlan | str | None,
    num_layers: int,
    variant: str | None = None,
    eps: float = 1e-6,
) -> PrecisionPlan | None:
    """A PrecisionPlan from a plan, a plan/dtype name (see ``make_plan``) or None."""
    if plan is None or isinstance(plan, PrecisionPlan):
        return plan
    return make_plan(plan, variant, num_layers, eps)


# ----------------------------------------------------------------------------- linears


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
        return dtype_of(plan.outer)
    return plan.layer(layer).dtype(group)


# ----------------------------------------------------------------------------- folding

_QK_BIAS = re.compile(r"^blocks\.\d+\.attn\.(to_q|to_k|add_q_proj|add_k_proj)\.bias$")
_V = re.compile(r"^blocks\.\d+\.attn\.(to_v|add_v_proj)\.(weight|bias)$")
_OUT_BIAS = re.compile(r"^blocks\.\d+\.attn\.(to_out|to_add_out)\.bias$")
_UP_BIAS = re.compile(r"^blocks\.\d+\.(img|txt)_mlp\.up\.bias$")
_DOWN = re.compile(r"^blocks\.\d+\.(img|txt)_mlp\.down\.(weight|bias)$")
_MOD = re.compile(r"^blocks\.\d+\.(img|txt)_mod\.(weight|bias)$")


def _mod_factors(layer: LayerPrecision) -> tuple[float, ...]:
    """Row factors of the 6 modulation chunks: mod1 (shift, scale, gate), mod2 (same)."""
    s, p, f = layer.qkv_scale, layer.attn_out_scale, layer.ffn_out_scale
    return (1 / s, 1 / s, s * p, 1.0, 1.0, f)


def fold_weight(name: str, w: mx.array, plan: PrecisionPlan) -> tuple[mx.array, bool]:
    """(``w`` with the plan's constants folded in, computed in float32; whether it changed).

    For a block with q/k/v input scale s, attention-output scale p, FFN output scale f and
    FFN input scale a (docs/precision.md):

    * modulation: mod1 shift and scale chunks x 1/s (scale bias -> (bias + 1)/s - 1, so that
      1 + scale becomes (1 + scale)/s), mod1 gate x s*p, mod2 gate x f;
    * q/k biases x 1/s (their input is already /s; RMSNorm with eps/s^2 makes q, k exact);
    * v weight x 1/p and bias x 1/(s*p), so attention (linear in v) comes out / (s*p);
    * attention out-projection bias x 1/(s*p) (its weight sees the already-scaled input);
    * FFN up bias x 1/a (the run time divides the input by a and multiplies the output back);
    * FFN down weight and bias x 1/f.

    Only the tensor's name and the plan decide the result, so conversion stays per tensor.
    """
    block, _ = weight_group(name)
    if block is None:
        return w, False
    layer = plan.layer(block)
    if not layer.folded:
        return w, False
    s, p, f, a = layer.folds
    if _MOD.match(name):
        factors = _mod_factors(layer)
        if factors == (1.0,) * 6:
            return w, False
        dim = w.shape[0] // 6
        rows = mx.concatenate([mx.full((dim,), c, dtype=mx.float32) for c in factors])
        x = w.astype(mx.float32)
        if name.endswith(".weight"):
            return x * rows[:, None], True
        offset = mx.concatenate(
            [mx.full((dim,), c, dtype=mx.float32) for c in (0, 1 / s - 1, 0, 0, 0, 0)]
        )
        return x * rows + offset, True
    factor = 1.0
    if _QK_BIAS.match(name):
        factor = 1 / s
    elif _V.match(name):
        factor = 1 / p if name.endswith(".weight") else 1 / (s * p)
    elif _OUT_BIAS.match(name):
        factor = 1 / (s * p)
    elif _UP_BIAS.match(name):
        factor = 1 / a
    elif _DOWN.match(name):
        factor = 1 / f
    if factor == 1.0:
        return w, False
    return w.astype(mx.float32) * factor, True


def fold_summary(plan: PrecisionPlan) -> list[str]:
    """What ``fold_weight`` bakes into the weights under ``plan`` (for config.json)."""
    if not plan.folded:
        return []
    out = []
    if any(layer.qkv_scale != 1 or layer.attn_out_scale != 1 for layer in plan.layers):
        out += [
            "img_mod/txt_mod mod1 shift x 1/s, scale -> (1 + scale)/s - 1, gate x s*p",
            "to_q/to_k/add_q_proj/add_k_proj bias x 1/s; q/k RMSNorm eps -> eps/s^2",
            "to_v/add_v_proj weight x 1/p, bias x 1/(s*p)",
            "to_out/to_add_out bias x 1/(s*p)",
        ]
    if any(layer.ffn_out_scale != 1 for layer in plan.layers):
        out += ["img_mod/txt_mod mod2 gate x f", "img_mlp/txt_mlp down weight and bias x 1/f"]
    if any(layer.ffn_in_scale != 1 for layer in plan.layers):
        out += ["img_mlp/txt_mlp up bias x 1/a (input x 1/a and output x a at run time)"]
    return out


# ----------------------------------------------------------------------------- other components

# What the VAE and the text encoder are stored and run in under each transformer plan. Neither
# gets a scaled FP16 plan: the VAE (a Wan 2.x derivative) is the reported cause of black FP16
# Edit outputs and is small (43 M parameters in its 2D form), so it keeps float32 on M1/M2,
# where float32 is native and emulated bf16 would be no faster; the 7.6 B-parameter language
# model (whose residual stream carries outlier channels past FP16's range) keeps bfloat16's
# float32 range and runs once per prompt. `scripts/measure_overflow.py` measures both on a
# checkpoint.
COMPONENT_DTYPES: dict[str, dict[str, str]] = {
    "fp32": {"vae": "float32", "text_encoder": "float32"},
    "bf16": {"vae": "bfloat16", "text_encoder": "bfloat16"},
    "fp16": {"vae": "float32", "text_encoder": "bfloat16"},
    "mixed": {"vae": "float32", "text_encoder": "bfloat16"},
}
_PLAN_OF_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def component_dtype(precision: str, component: str) -> str | None:
    """The dtype ``component`` (vae, text_encoder) uses under a transformer precision plan, or
    None when the plan does not govern it (e.g. the transformer itself)."""
    if precision == "auto":
        precision = auto_precision()[0]
    name = _PLAN_OF_DTYPE.get(precision, precision)
    if name not in COMPONENT_DTYPES:
        raise RequestError(
            f"unknown precision {precision!r}; choose one of {', '.join(PLAN_NAMES)}"
        )
    return COMPONENT_DTYPES[name].get(component)
