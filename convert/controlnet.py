"""diffusers QwenImageControlNetModel -> qwen_mlx QwenImageControlNet weights.

A standalone ControlNet folder (config.json + safetensors, as the InstantX repositories ship it)
or a pipeline's ``controlnet/`` folder. With ``options.precision`` the weights are stored (and,
for ``fp16``, folded) for that plan, the residual projections included (see
``qwen_mlx.models.controlnet``). ControlNet configs do not name the base model: the fp16 scale
table is ``options.variant``'s (default Qwen-Image).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import mlx.core as mx

from qwen_mlx.convert.options import ConvertOptions
from qwen_mlx.convert.transformer import plan_for
from qwen_mlx.dtypes import DTYPES
from qwen_mlx.models.controlnet import (
    ControlNetConfig,
    QwenImageControlNet,
    controlnet_dtype,
    fold_controlnet_weight,
    quantization_plan,
    residual_scale,
)
from qwen_mlx.naming import TRANSFORMER_RULES, rename
from qwen_mlx.precision import PrecisionPlan, fold_summary
from qwen_mlx.quantize import linear_shapes, quantization_config, quantize_weights
from qwen_mlx.variants import normalize_variant

# controlnet_blocks.* and controlnet_x_embedder.* keep their names.
RULES = TRANSFORMER_RULES


def prepare_options(folder: Path, options: ConvertOptions) -> ConvertOptions:
    if options.variant:
        return replace(options, variant=normalize_variant(options.variant))
    return options


def _storage(plan: PrecisionPlan, options: ConvertOptions, name: str) -> mx.Dtype:
    if options.precision and options.dtype == "float32":
        return DTYPES["float32"]
    return controlnet_dtype(plan, name)


def convert_weights(
    weights: dict[str, mx.array], config: dict, options: ConvertOptions
) -> dict[str, mx.array]:
    plan = plan_for(config, options)
    out = {}
    for name, w in weights.items():
        new = rename(name, RULES)
        folded, _ = fold_controlnet_weight(new, w, plan)  # in float32, before the cast
        out[new] = folded.astype(_storage(plan, options, new))
    if options.quantize:
        quant = quantization_plan(options.quantize, options.group_size)
        layers = int(config.get("num_layers", 60))
        out = quantize_weights(
            out, lambda path, shape: quant.bits_for(path, shape, layers), quant.group_size
        )
    return out


def convert_config(config: dict, options: ConvertOptions) -> dict:
    plan = plan_for(config, options)
    folded = fold_summary(plan)
    if residual_scale(plan) != 1.0:
        folded.append("controlnet_blocks bias x 1/c (input x 1/c, output x c at run time)")
    section = {
        "precision_plan": plan.to_dict(),
        "folded": folded,
        "variant": normalize_variant(options.variant) if options.variant else None,
    }
    if options.precision:
        section["dtype"] = "float32" if options.dtype == "float32" else plan.storage_dtype()
    config["qwen_mlx"] = section
    if options.quantize:
        quant = quantization_plan(options.quantize, options.group_size)
        skeleton = QwenImageControlNet(ControlNetConfig.from_dict(config))  # lazy: no memory
        config["quantization"] = quantization_config(
            quant, linear_shapes(skeleton), skeleton.config.num_layers
        )
    return config
