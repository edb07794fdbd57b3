"""diffusers QwenImageTransformer2DModel -> qwen_mlx QwenImageTransformer weights.

With ``options.precision`` the weights are stored (and, for ``fp16``, folded) for that
precision plan; see ``qwen_mlx.precision``. Each tensor's result depends only on its name and
the plan, so conversion stays shard by shard.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import mlx.core as mx

from qwen_mlx.convert.options import ConvertOptions
from qwen_mlx.dtypes import DTYPES
from qwen_mlx.naming import TRANSFORMER_RULES, rename
from qwen_mlx.precision import PrecisionPlan, fold_summary, fold_weight, make_plan, plan_dtype
from qwen_mlx.quantize import (
    QuantizationPlan,
    linear_shapes,
    quantization_config,
    quantize_weights,
    transformer_plan,
)
from qwen_mlx.variants import detect_variant, normalize_variant

RULES = TRANSFORMER_RULES


def prepare_options(folder: Path, options: ConvertOptions) -> ConvertOptions:
    """Fill in the model variant (which picks the fp16 scale table) from the checkpoint."""
    if options.variant:
        return replace(options, variant=normalize_variant(options.variant))
    from qwen_mlx.convert.io import read_json

    config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    return replace(options, variant=detect_variant(folder, config))


def _variant(options: ConvertOptions) -> str | None:
    return normalize_variant(options.variant) if options.variant else None


def plan_for(config: dict, options: ConvertOptions) -> PrecisionPlan:
    """The plan the weights are written for.

    No ``options.precision``: uniform in ``options.dtype`` (nothing folded). With a precision
    plan the plan decides each group's dtype, except that ``dtype="float32"`` keeps every tensor
    in float32 (constants still folded; the plan's dtypes are applied when the model loads): a
    full-precision copy of a folded checkpoint, and the way to check that folding is exact.
    """
    num_layers = int(config.get("num_layers", 60))
    if not options.precision:
        return replace(PrecisionPlan.uniform(options.dtype, num_layers), variant=_variant(options))
    return make_plan(options.precision, options.variant, num_layers, float(config.get("eps", 1e-6)))


def _storage(plan: PrecisionPlan, options: ConvertOptions, name: str) -> mx.Dtype:
    if options.precision and options.dtype == "float32":
        return DTYPES["float32"]
    return plan_dtype(plan, name)


def quant_plan_for(options: ConvertOptions) -> QuantizationPlan | None:
    """The quantization plan ``--quantize`` asks for, or None."""
    return transformer_plan(options.quantize, options.group_size) if options.quantize else None


def convert_weights(
    weights: dict[str, mx.array], config: dict, options: ConvertOptions
) -> dict[str, mx.array]:
    plan = plan_for(config, options)
    out = {}
    for name, w in weights.items():
        new = rename(name, RULES)
        folded, _ = fold_weight(new, w, plan)  # in float32, before the cast
        out[new] = folded.astype(_storage(plan, options, new))
    quant = quant_plan_for(options)
    if quant is not None:  # after folding and the cast: quantize in the storage dtype
        layers = int(config.get("num_layers", 60))
        out = quantize_weights(
            out, lambda path, shape: quant.bits_for(path, shape, layers), quant.group_size
        )
    return out


def convert_config(config: dict, options: ConvertOptions) -> dict:
    plan = plan_for(config, options)
    section = {
        "precision_plan": plan.to_dict(),
        "folded": fold_summary(plan),
        "variant": _variant(options),
    }
    if options.precision:
        section["dtype"] = "float32" if options.dtype == "float32" else plan.storage_dtype()
    config["qwen_mlx"] = section
    quant = quant_plan_for(options)
    if quant is not None:
        from qwen_mlx.models.transformer import QwenImageTransformer, TransformerConfig

        # A skeleton lists the linears (its random init is lazy: nothing is allocated).
        skeleton = QwenImageTransformer(TransformerConfig.from_dict(config))
        config["quantization"] = quantization_config(
            quant, linear_shapes(skeleton), skeleton.config.num_layers
        )
    return config
