"""diffusers QwenImageTransformer2DModel -> qwen_mlx QwenImageTransformer weights."""

from __future__ import annotations

import mlx.core as mx

from qwen_mlx.precision import PrecisionPlan, plan_dtype

from .options import ConvertOptions
from .rules import rename

RULES = (
    (r"^transformer_blocks\.", "blocks."),
    (r"_mod\.1\.", "_mod."),
    (r"\.to_out\.0\.", ".to_out."),
    (r"_mlp\.net\.0\.proj\.", "_mlp.up."),
    (r"_mlp\.net\.2\.", "_mlp.down."),
    (r"^time_text_embed\.timestep_embedder\.", "time_embed."),
)


def plan_for(config: dict, options: ConvertOptions) -> PrecisionPlan:
    return PrecisionPlan.uniform(options.dtype, int(config.get("num_layers", 60)))


def convert_weights(
    weights: dict[str, mx.array], config: dict, options: ConvertOptions
) -> dict[str, mx.array]:
    plan = plan_for(config, options)
    out = {}
    for name, w in weights.items():
        new = rename(name, RULES)
        out[new] = w.astype(plan_dtype(plan, new))
    return out


def convert_config(config: dict, options: ConvertOptions) -> dict:
    plan = plan_for(config, options)
    config["qwen_mlx"] = {"precision_plan": plan.to_dict(), "folded": []}
    return config
