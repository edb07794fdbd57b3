"""4- and 8-bit affine quantization (``mx.quantize`` / ``nn.QuantizedLinear``).

One mechanism, driven by data:

* a ``QuantizationPlan`` says, per layer path, how many bits a linear gets (or None: kept in the
  precision plan's float dtype). ``TRANSFORMER_PLANS`` and ``TEXT_ENCODER_PLANS`` are the tables;
* ``quantize_weights`` turns a name->array dict into the quantized layout (converter path, and the
  quantize-at-load path, which therefore give identical weights);
* ``quantize_model`` turns a model's linears into ``QuantizedLinear`` (embeddings into
  ``nn.QuantizedEmbedding``) wherever a ``<path>.scales`` weight exists, inferring each layer's
  bits from the packed shapes, so a strict ``load_weights`` follows (mlx-lm's pattern).

A quantized layer is stored as ``<path>.weight`` (packed uint32), ``<path>.scales`` and
``<path>.biases`` (the float dtype the precision plan gives that layer; the layer computes in
it), plus the layer's own ``<path>.bias`` if it has one.

Quantizing casts to the storage dtype first and then quantizes, so the scales and the packed
values are consistent: quantizing in float32 and rounding the scales to bfloat16 afterwards
would add about half an 8-bit step of error (measured: 0.79 % vs 0.70 % relative weight error).
Any folding (the FP16 plan's constants) happens before that, in float32.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn

from qwen_mlx.errors import RequestError

GROUP_SIZE = 64
BITS = (4, 8)
MODE = "affine"


@dataclass(frozen=True)
class QuantizationPlan:
    """Which layers are quantized and at how many bits.

    ``keep``: regexes of layer paths left in float; ``rules``: (regex, bits) overrides, first
    match wins; ``edge_blocks`` / ``edge_bits``: the first and last N transformer blocks
    (``blocks.<i>.``) at ``edge_bits`` (what the better GGUF K-quants do). A layer whose input
    width is not a multiple of ``group_size`` (or that is not 2D) stays in float.
    """

    bits: int
    group_size: int = GROUP_SIZE
    keep: tuple[str, ...] = ()
    rules: tuple[tuple[str, int], ...] = ()
    edge_blocks: int = 0
    edge_bits: int = 8

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.group_size not in (32, 64, 128):
            raise RequestError(f"group size must be 32, 64 or 128, got {self.group_size}")

    def bits_for(self, path: str, shape: tuple[int, ...], num_layers: int = 0) -> int | None:
        """Bits for the layer at ``path`` whose weight has ``shape``; None keeps it in float."""
        if len(shape) != 2 or shape[-1] % self.group_size:
            return None
        if any(_regex(p).search(path) for p in self.keep):
            return None
        for pattern, bits in self.rules:
            if _regex(pattern).search(path):
                return bits
        m = re.match(r"^blocks\.(\d+)\.", path)
        if m and self.edge_blocks:
            i = int(m.group(1))
            if i < self.edge_blocks or i >= num_layers - self.edge_blocks:
                return self.edge_bits
        return self.bits

    def to_dict(self) -> dict:
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "keep": list(self.keep),
            "rules": [list(r) for r in self.rules],
            "edge_blocks": self.edge_blocks,
            "edge_bits": self.edge_bits,
        }


@lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern:
    return re.compile(pattern)


def check_bits(bits: int) -> int:
    if bits not in BITS:
        raise RequestError(f"quantization bits must be 4 or 8, got {bits}")
    return bits


# ----------------------------------------------------------------------------- the tables

# Transformer layers never quantized: the input/output projections and the output norm sit where
# an error reaches every token of the result, and with the time embedding they are tiny (about
# 0.1 % of the parameters), so keeping them costs nothing.
TRANSFORMER_KEEP = (r"^(img_in|txt_in|proj_out|norm_out|time_embed)(\.|$)",)

# Under 4 bits, the first and last blocks and every block's modulation stay at 8 bits.
# * first/last blocks: 2 of 60 blocks at 8 bits add 0.23 GB to a 7.9 GB 4-bit transformer;
#   the GGUF K-quants (Q4_K_M) make the same choice for the same reason (the entry and exit of
#   the residual stream are the most sensitive layers of a trained model).
# * modulation (img_mod/txt_mod, 6.8 B parameters): its outputs scale and gate every branch, and
#   4 bits put about 9 % noise on each of them (scripts/bench_memory.py measures it). With the
#   adaLN cache these weights are never resident, so 8 bits costs only disk (+3.6 GB) and the
#   slower no-cache path (adaln_cache=False).
TRANSFORMER_PLANS: dict[int, QuantizationPlan] = {
    8: QuantizationPlan(8, keep=TRANSFORMER_KEEP),
    4: QuantizationPlan(
        4, keep=TRANSFORMER_KEEP, rules=((r"^blocks\.\d+\.(img|txt)_mod$", 8),), edge_blocks=1
    ),
}

# Text encoder: the language model's linears and its embedding table; the vision tower (Edit
# only) stays in float.
TEXT_ENCODER_KEEP = (r"^visual(\.|$)",)
TEXT_ENCODER_PLANS: dict[int, QuantizationPlan] = {
    8: QuantizationPlan(8, keep=TEXT_ENCODER_KEEP),
    4: QuantizationPlan(4, keep=TEXT_ENCODER_KEEP),
}


def text_encoder_bits(choice: str | int | None, transformer_bits: int | None) -> int | None:
    """The language model's bits for a user's choice: 4, 8, "none", or "auto" (the default).

    "auto" is 8 bits when the transformer is quantized and none otherwise: 8 bits costs 1.4 %
    RMS error in the prompt embeddings (4 bits: 23 %; a random full-width 28-layer model,
    scripts/bench_memory.py), far below what a 4-bit transformer adds, and it halves the
    text-encoder stage (15.2 -> 8.1 GB) that would otherwise set the peak on a 16 GB Mac.
    """
    if choice is None or choice == "none":
        return None
    if choice == "auto":
        return 8 if transformer_bits else None
    try:
        return check_bits(int(choice))
    except (TypeError, ValueError):
        raise RequestError(
            f"text encoder quantization must be 4, 8, none or auto, got {choice!r}"
        ) from None


def transformer_plan(bits: int, group_size: int = GROUP_SIZE) -> QuantizationPlan:
    base = TRANSFORMER_PLANS[check_bits(bits)]
    return QuantizationPlan(
        bits, group_size, base.keep, base.rules, base.edge_blocks, base.edge_bits
    )


def text_encoder_plan(bits: int, group_size: int = GROUP_SIZE) -> QuantizationPlan:
    base = TEXT_ENCODER_PLANS[check_bits(bits)]
    return QuantizationPlan(bits, group_size, base.keep, base.rules)


# ----------------------------------------------------------------------------- weights


def quantize_tensor(w: mx.array, bits: int, group_size: int = GROUP_SIZE) -> dict[str, mx.array]:
    """{"weight", "scales", "biases"} of one float weight (scales in ``w``'s dtype)."""
    wq, scales, biases = mx.quantize(w, group_size=group_size, bits=bits, mode=MODE)
    return {"weight": wq, "scales": scales, "biases": biases}


def quantize_weights(
    weights: dict[str, mx.array],
    bits_for: Callable[[str, tuple[int, ...]], int | None],
    group_size: int = GROUP_SIZE,
) -> dict[str, mx.array]:
    """Quantize every ``<path>.weight`` that ``bits_for(path, shape)`` gives bits to.

    The weights must already be in their storage dtype (folded and cast); other tensors pass
    through. Lazy: nothing is computed until the result is evaluated or saved.
    """
    out: dict[str, mx.array] = {}
    for name, w in weights.items():
        path, _, leaf = name.rpartition(".")
        bits = None
        if leaf == "weight" and mx.issubdtype(w.dtype, mx.floating):
            bits = bits_for(path, tuple(w.shape))
        if bits is None:
            out[name] = w
            continue
        for k, v in quantize_tensor(w, bits, group_size).items():
            out[f"{path}.{k}"] = v
    return out


# One streaming group per transformer block / language-model layer; everything else is one group.
_GROUP = re.compile(r"^((?:blocks|language_model\.layers)\.\d+)\.")


def quantize_stream(
    weights: dict[str, mx.array],
    bits_for: Callable[[str, tuple[int, ...]], int | None],
    group_size: int = GROUP_SIZE,
    prepare: Callable[[str, mx.array], mx.array] | None = None,
) -> dict[str, mx.array]:
    """``quantize_weights`` one block (or layer) at a time, for quantizing at load.

    ``weights`` are lazy (e.g. ``mx.load``): each group's tensors are popped from the dict,
    prepared (``prepare(name, w)``: fold and cast for the precision plan), quantized and
    evaluated before the next group is read, so the float weights are never all resident.
    Gives exactly what the converter writes for the same inputs.
    """
    groups: dict[str, list[str]] = {}
    for name in weights:
        m = _GROUP.match(name)
        groups.setdefault(m.group(1) if m else "", []).append(name)
    out: dict[str, mx.array] = {}
    for names in groups.values():
        part = {}
        for name in names:
            w = weights.pop(name)
            part[name] = prepare(name, w) if prepare is not None else w
        part = quantize_weights(part, bits_for, group_size)
        mx.eval(part)
        out.update(part)
    return out


def quantized_layers(weights: dict[str, mx.array], group_size: int) -> dict[str, dict]:
    """{path: {"bits", "group_size"}} of every quantized layer in ``weights``.

    The bits follow from the shapes: ``weight`` packs ``in * bits / 32`` uint32 per row and
    ``scales`` holds ``in / group_size`` per row.
    """
    layers = {}
    for name, scales in weights.items():
        if not name.endswith(".scales"):
            continue
        path = name[: -len(".scales")]
        packed = weights.get(f"{path}.weight")
        if packed is None or packed.dtype != mx.uint32:
            raise ValueError(f"{path}: .scales without a packed uint32 .weight")
        in_features = scales.shape[-1] * group_size
        bits = packed.shape[-1] * 32 // in_features
        if bits not in BITS or packed.shape[-1] * 32 != bits * in_features:
            raise ValueError(
                f"{path}: packed weight {tuple(packed.shape)} and scales {tuple(scales.shape)} "
                f"do not match {group_size}-element groups of 4 or 8 bits"
            )
        layers[path] = {"bits": bits, "group_size": group_size, "mode": MODE}
    return layers


def unpacked_shapes(
    shapes: dict[str, tuple[int, ...]], group_size: int
) -> dict[str, tuple[int, ...]]:
    """Weight shapes as the float model has them: a quantized layer's packed ``.weight``
    becomes (out, in) with in = scale groups x ``group_size``; its scales and biases go."""
    out = {}
    for name, shape in shapes.items():
        path, _, leaf = name.rpartition(".")
        scales = shapes.get(f"{path}.scales")
        if scales is None:
            out[name] = tuple(shape)
        elif leaf == "weight":
            out[name] = (shape[0], scales[-1] * group_size)
        elif leaf not in ("scales", "biases"):
            out[name] = tuple(shape)
    return out


def is_quantized(weights: dict[str, mx.array]) -> bool:
    return any(k.endswith(".scales") for k in weights)


class QuantizedLinear(nn.QuantizedLinear):
    """``nn.QuantizedLinear`` that, on the CPU, runs a bfloat16 / float16 layer through MLX's
    float32 quantized matmul and rounds the result to the layer's dtype.

    MLX's CPU quantized matmul in a half dtype is 10x (bf16) to 30x (fp16) slower than in
    float32 and accumulates in the half dtype: one 18432x3072 8-bit modulation linear took 2.4 s
    for a single row (float32: 0.24 s), so the adaLN table of the full-size model took minutes
    per step. Metal (and float32 layers) run ``nn.QuantizedLinear`` unchanged.
    """

    def __call__(self, x: mx.array) -> mx.array:
        scales = self["scales"]
        if scales.dtype == mx.float32 or mx.default_device() != mx.cpu:
            return super().__call__(x)
        f32, biases = mx.float32, self.get("biases")
        y = mx.quantized_matmul(
            x.astype(f32),
            self["weight"],
            scales=scales.astype(f32),
            biases=None if biases is None else biases.astype(f32),
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
        )
        dtype = _promoted(x.dtype, scales.dtype)
        if "bias" in self:
            y = y + self["bias"].astype(f32)
            dtype = _promoted(dtype, self["bias"].dtype)
        return y.astype(dtype)


def _promoted(a: mx.Dtype, b: mx.Dtype) -> mx.Dtype:
    """MLX's promotion of two float dtypes (bfloat16 with float16 gives float32)."""
    return a if a == b else mx.float32


def _as_ours(model: nn.Module) -> None:
    """Every ``nn.QuantizedLinear`` that ``nn.quantize`` made becomes a ``QuantizedLinear`` (same
    parameters and attributes; only ``__call__`` differs)."""
    for _, module in model.named_modules():
        if type(module) is nn.QuantizedLinear:
            module.__class__ = QuantizedLinear


def quantize_model(model: nn.Module, weights: dict[str, mx.array], group_size: int) -> nn.Module:
    """Swap in quantized layers wherever ``weights`` holds a quantized one (in place).

    Afterwards ``model.load_weights(weights, strict=True)`` loads them.
    """
    layers = quantized_layers(weights, group_size)
    if not layers:
        return model
    found = set()

    def predicate(path: str, module: nn.Module) -> bool | dict:
        if path in layers:
            found.add(path)
            return dict(layers[path])
        return False

    nn.quantize(model, class_predicate=predicate)
    _as_ours(model)
    missing = sorted(set(layers) - found)
    if missing:
        raise ValueError(f"quantized weights for layers the model does not have: {missing[:5]}")
    return model


def linear_from_weights(weights: dict[str, mx.array], group_size: int = GROUP_SIZE) -> nn.Module:
    """An ``nn.Linear`` or ``QuantizedLinear`` holding ``weights`` ({"weight", "bias", ...})."""
    w = weights["weight"]
    bias = "bias" in weights
    if "scales" in weights:
        bits = w.shape[-1] * 32 // (weights["scales"].shape[-1] * group_size)
        in_features = w.shape[-1] * 32 // bits
        layer = QuantizedLinear(in_features, w.shape[0], bias, group_size, bits, MODE)
    else:
        layer = nn.Linear(w.shape[-1], w.shape[0], bias)
    layer.load_weights(list(weights.items()), strict=True)
    return layer


# ----------------------------------------------------------------------------- layouts


def linear_shapes(model: nn.Module) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(path, weight shape) of every quantizable leaf (linear, embedding) of a float model."""
    for path, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            yield path, tuple(module.weight.shape)


def quantization_config(
    plan: QuantizationPlan, shapes: Iterator[tuple[str, tuple[int, ...]]], num_layers: int = 0
) -> dict:
    """The ``"quantization"`` section of a component config: the defaults, which layers stayed
    in float, and the layers whose bits differ from the default (mlx-lm records those by path)."""
    unquantized, layers = [], {}
    for path, shape in shapes:
        bits = plan.bits_for(path, shape, num_layers)
        if bits is None:
            unquantized.append(path)
        elif bits != plan.bits:
            layers[path] = {"bits": bits, "group_size": plan.group_size}
    return {
        "bits": plan.bits,
        "group_size": plan.group_size,
        "mode": MODE,
        "unquantized": sorted(unquantized),
        "plan": plan.to_dict(),
        **layers,
    }


def group_size_of(config: dict) -> int:
    return int(config.get("quantization", {}).get("group_size", GROUP_SIZE))
