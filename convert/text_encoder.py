"""Qwen2.5-VL text encoder: Hugging Face weights -> qwen-mlx layout.

Two source namings are accepted:
- transformers 5: ``model.language_model.layers.*``, ``model.visual.*``, ``lm_head.weight``;
- the released checkpoint (transformers 4.x): ``model.layers.*``, ``visual.*``, ``lm_head.weight``.

Output groups: ``language_model.*`` (embed_tokens, layers, norm: what prompt encoding loads) and
``visual.*`` (the vision tower, kept untouched for Qwen-Image-Edit). ``lm_head`` is dropped: the
prompt embeddings are hidden states, never logits. Linear weights keep PyTorch's (out, in) layout,
which is MLX's too.
"""

from __future__ import annotations

import re

import mlx.core as mx

from qwen_mlx.convert.errors import ConversionError
from qwen_mlx.convert.options import ConvertOptions
from qwen_mlx.convert.rules import Rule, rename
from qwen_mlx.dtypes import cast_floats
from qwen_mlx.quantize import (
    linear_shapes,
    quantization_config,
    quantize_weights,
    text_encoder_plan,
)

RULES: list[Rule] = [
    (r"^model\.language_model\.", "language_model."),  # transformers 5
    (r"^model\.visual\.", "visual."),  # transformers 5
    (r"^model\.", "language_model."),  # released checkpoint (model.layers, model.norm, ...)
]
DROP = re.compile(r"^lm_head\.|\.rotary_emb\.inv_freq$")
GROUPS = ("language_model.", "visual.")


def convert_weights(
    weights: dict[str, mx.array], config: dict, options: ConvertOptions
) -> dict[str, mx.array]:
    out: dict[str, mx.array] = {}
    for name, value in weights.items():
        if DROP.search(name):
            continue
        new = rename(name, RULES)
        if not new.startswith(GROUPS):
            raise ConversionError(f"unexpected text encoder weight {name!r}")
        out[new] = value
    out = cast_floats(out, options.mx_dtype)
    if options.quantize_text_encoder:  # in the storage dtype, after the cast
        plan = text_encoder_plan(options.quantize_text_encoder, options.group_size)
        out = quantize_weights(out, plan.bits_for, plan.group_size)
    return out


def convert_config(config: dict, options: ConvertOptions) -> dict:
    section = dict(config.get("qwen_mlx", {}))
    section.update(
        {
            "folded": [],
            "dropped": ["lm_head"],
            "groups": {"language_model": "language model", "visual": "vision tower"},
        }
    )
    config["qwen_mlx"] = section
    if options.quantize_text_encoder:
        from qwen_mlx.models.text_encoder import Qwen25VLTextModel, TextEncoderConfig

        plan = text_encoder_plan(options.quantize_text_encoder, options.group_size)
        skeleton = Qwen25VLTextModel(TextEncoderConfig.from_dict(config))  # lazy: no memory
        shapes = ((f"language_model.{p}", s) for p, s in linear_shapes(skeleton))
        config["quantization"] = quantization_config(plan, shapes)
        config["quantization"]["unquantized"].append("visual")
    return config
