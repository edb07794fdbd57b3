"""Does a component's config.json describe its weights? Checked from shapes alone.

The converter runs this before writing anything and the pipeline before its first expensive
stage, so a ``num_layers`` or ``attention_head_dim`` that does not match the weights is a
one-line error naming the key and both values, not a failure after minutes of text encoding.

Two passes, both on converted (MLX) tensor names and shapes (no tensor is read):
1. the hyper-parameters the weights imply (``IMPLIED``, one table row per key);
2. every parameter of a model built from the config (lazily: MLX allocates nothing until
   evaluated) against the weights, for anything the table does not name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any

from mlx.utils import tree_flatten

from qwen_mlx.errors import CheckpointError

Shapes = dict[str, tuple[int, ...]]


class ConfigMismatchError(CheckpointError):
    """A component's config does not describe its weights."""


@dataclass(frozen=True)
class Implied:
    """A config key the weights determine: dimension ``axis`` of tensor ``tensor`` (divided by
    the implied value of ``per``), or, with ``axis=None``, how many layer indices the regex
    ``tensor`` matches."""

    key: str
    tensor: str
    axis: int | None = None
    per: str | None = None


IMPLIED: dict[str, tuple[Implied, ...]] = {
    "transformer": (
        Implied("num_layers", r"^blocks\.(\d+)\."),
        Implied("attention_head_dim", "blocks.0.attn.norm_q.weight", 0),
        Implied("num_attention_heads", "img_in.weight", 0, per="attention_head_dim"),
        Implied("in_channels", "img_in.weight", 1),
        Implied("joint_attention_dim", "txt_in.weight", 1),
    ),
    "controlnet": (
        Implied("num_layers", r"^blocks\.(\d+)\."),
        Implied("attention_head_dim", "blocks.0.attn.norm_q.weight", 0),
        Implied("num_attention_heads", "img_in.weight", 0, per="attention_head_dim"),
        Implied("in_channels", "img_in.weight", 1),
        Implied("joint_attention_dim", "txt_in.weight", 1),
    ),
    "vae": (
        Implied("z_dim", "post_quant_conv.weight", 0),
        Implied("base_dim", "encoder.conv_in.weight", 0),
    ),
    "text_encoder": (
        Implied("num_hidden_layers", r"^language_model\.layers\.(\d+)\."),
        Implied("vocab_size", "language_model.embed_tokens.weight", 0),
        Implied("hidden_size", "language_model.embed_tokens.weight", 1),
        Implied("intermediate_size", "language_model.layers.0.mlp.gate_proj.weight", 0),
    ),
}


def _config_class(component: str):
    if component == "controlnet":
        from .models.controlnet import ControlNetConfig

        return ControlNetConfig
    if component == "transformer":
        from .models.transformer import TransformerConfig

        return TransformerConfig
    if component == "vae":
        from .models.vae import VAEConfig

        return VAEConfig
    from .models.text_encoder import TextEncoderConfig

    return TextEncoderConfig


def config_value(component: str, config: dict, key: str) -> Any:
    """``key`` as the runtime will see it: from config.json, else the config class default."""
    hyper = _config_class(component).normalize(dict(config))  # e.g. a nested text_config
    if key in hyper:
        return hyper[key]
    defaults = {f.name: f for f in fields(_config_class(component))}
    return defaults[key].default


def implied_values(component: str, shapes: Shapes) -> dict[str, int]:
    """{config key: value} the weights imply (keys whose tensors are absent are left out)."""
    values: dict[str, int] = {}
    for rule in IMPLIED.get(component, ()):
        if rule.axis is None:
            pattern = re.compile(rule.tensor)
            found = {m.group(1) for name in shapes if (m := pattern.match(name))}
            if found:
                values[rule.key] = len(found)
            continue
        shape = shapes.get(rule.tensor)
        if shape is None or len(shape) <= rule.axis:
            continue
        value = shape[rule.axis]
        if rule.per is not None:
            per = values.get(rule.per)
            if not per or value % per:
                continue
            value //= per
        values[rule.key] = value
    return values


def _skeleton(component: str, config: dict) -> tuple[str, Shapes]:
    """(name prefix, parameter shapes) of a model built from ``config``, lazily."""
    if component == "transformer":
        from .models.transformer import QwenImageTransformer, TransformerConfig

        model, prefix = QwenImageTransformer(TransformerConfig.from_dict(config)), ""
    elif component == "controlnet":
        from .models.controlnet import ControlNetConfig, QwenImageControlNet

        model, prefix = QwenImageControlNet(ControlNetConfig.from_dict(config)), ""
    elif component == "vae":
        from .models.vae import QwenImageVAE, VAEConfig

        model, prefix = QwenImageVAE(VAEConfig.from_dict(config)), ""
    else:
        from .models.text_encoder import Qwen25VLTextModel, TextEncoderConfig

        model = Qwen25VLTextModel(TextEncoderConfig.from_dict(config))
        prefix = "language_model."
    return prefix, {prefix + k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


def _fmt(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def check_component(component: str, config: dict, shapes: Shapes, where: str) -> None:
    """Raise ConfigMismatchError (one line, naming ``where``) unless ``config`` describes
    ``shapes``. Components other than transformer, controlnet, vae and text_encoder are not
    checked."""
    if component not in IMPLIED:
        return
    if "quantization" in config:  # packed 4/8-bit weights: check the shapes they stand for
        from qwen_mlx.quantize import group_size_of, unpacked_shapes

        shapes = unpacked_shapes(shapes, group_size_of(config))
    wrong = []
    try:
        for key, value in implied_values(component, shapes).items():
            stated = config_value(component, config, key)
            if stated != value:
                wrong.append(f"{key} is {stated!r} but the weights have {value}")
    except ValueError as e:  # e.g. an unsupported rope type in a nested config
        raise ConfigMismatchError(f"{where}: invalid config: {e}") from e
    if wrong:
        raise ConfigMismatchError(f"{where}: config does not match the weights: {'; '.join(wrong)}")
    try:
        prefix, expected = _skeleton(component, config)
    except (TypeError, ValueError) as e:
        raise ConfigMismatchError(f"{where}: invalid config: {e}") from e
    mine = {k: v for k, v in shapes.items() if k.startswith(prefix)}
    problems = [
        f"{k} is {_fmt(mine[k])} in the weights, {_fmt(s)} by the config"
        for k, s in expected.items()
        if k in mine and mine[k] != s
    ]
    missing = sorted(set(expected) - set(mine))
    extra = sorted(set(mine) - set(expected))
    if missing:
        problems.append(f"{len(missing)} weight(s) missing (e.g. {missing[0]})")
    if extra:
        problems.append(f"{len(extra)} unexpected weight(s) (e.g. {extra[0]})")
    if problems:
        more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        shown = "; ".join(problems[:3]) + more
        raise ConfigMismatchError(f"{where}: config does not match the weights: {shown}")


def check_source(source) -> None:
    """Check every component of a ``loading.ModelSource`` from headers alone (no tensor is
    read): converted components directly, unconverted ones through the converter's own check."""
    from qwen_mlx.io import folder_tensors, is_converted, read_json

    for name in IMPLIED:
        if not source.has(name):
            continue
        folder = source.folder(name)
        if is_converted(folder):
            shapes = {k: v.shape for k, v in folder_tensors(folder).items()}
            config = folder / "config.json"
            check_component(name, read_json(config), shapes, str(config))
        else:
            from qwen_mlx.convert import ConversionError, ConvertOptions
            from qwen_mlx.convert.convert import check_component_folder

            try:
                check_component_folder(folder, ConvertOptions(dtype=source.dtype))
            except ConversionError as e:
                raise CheckpointError(str(e)) from e
