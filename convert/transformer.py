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


def convert_weights(
    weights: dict[str, mx.array], config: dict, options: ConvertOptions
) -> dict[str, mx.array]:
    plan = plan_for(config, options)
    out = {}
    for name, w in weights.items():
        new = rename(name, RULES)
        folded, _ = fold_weight(new, w, plan)  # in float32, before the cast
        out[new] = folded.astype(_storage(plan, options, new))
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
    return config
