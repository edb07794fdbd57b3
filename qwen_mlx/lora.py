"""LoRAs for the Qwen-Image transformer: read any common key layout, fuse or run beside.

Reading (``read_lora``) accepts every layout diffusers 0.42.1 loads for Qwen-Image, plus the full
weight deltas some trainers write:

* PEFT / diffusers: ``[transformer.]<module>.lora_A.weight`` / ``lora_B.weight`` (``lora_B.bias``
  too), PEFT's ``lora_A.default.weight``, the alpha in the file's ``lora_adapter_metadata``;
* kohya: ``lora_unet_<module with _ for .>.lora_down.weight`` / ``lora_up.weight`` / ``.alpha``;
* ``diffusion_model.<module>…`` (how the Lightning LoRAs ship), with or without ``.alpha``;
* ``<module>.lora.down.weight`` / ``lora.up.weight``;
* ``<module>.diff`` / ``<module>.diff_b``: a full delta of the weight / bias.

Module names are diffusers' and map onto this package's transformer weights with the same few
rules as the converter. Every key must land on a weight of the model: anything else is an error
listing the keys (a LoRA for another model says which one it looks like).

A low-rank update adds ``scale * alpha / rank * up @ down`` to the weight (alpha / rank = 1
without an alpha). Two ways to apply it:

* ``fuse_weights``: on a name -> array dict before the model is built (``from_weights``), in
  float32 and before the precision plan folds and casts (every fold scales rows or whole tensors,
  so fusing first is exact); also the way to fuse before quantizing;
* ``LoraStack``: on a loaded model. Float weights are fused in float32 (the delta folded with the
  model's plan) and cast back; quantized linears get a low-rank side path (``LoraLinear``).
  ``clear()`` restores the original weights: re-read through ``reload`` when given (the pipeline
  re-reads the checkpoint), else from copies kept of the weights a LoRA touched.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from qwen_mlx.errors import QwenMLXError
from qwen_mlx.naming import TRANSFORMER_RULES, rename
from qwen_mlx.precision import PrecisionPlan, fold_weight

F32 = mx.float32


class LoraError(QwenMLXError, ValueError):
    """A LoRA file that cannot be applied to this model (the message says why)."""


# ----------------------------------------------------------------------------- PATH[:SCALE]

# A scale as people write it: 0.8, -1, .5, 1e-1. Not Python's float() grammar, which also takes
# "1_0" (10), "nan", "inf" and surrounding spaces.
SCALE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def check_lora_scale(scale, where: str = "") -> float:
    """A LoRA scale as a float: a finite real number (negative scales subtract a LoRA), else a
    one-line LoraError."""
    at = f" for {where}" if where else ""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise LoraError(f"LoRA scale{at} must be a number, got {scale!r}")
    if not math.isfinite(scale):
        raise LoraError(f"LoRA scale{at} must be finite, got {scale!r}")
    return float(scale)


def parse_lora_spec(spec: str) -> tuple[Path, float]:
    """``PATH[:SCALE]`` (``--lora style.safetensors:0.8``) -> (path, scale), the file checked.

    A spec naming an existing file is that file at scale 1 (a colon in a file name is kept).
    Otherwise the text after the last colon is the scale, when the text before it names a
    ``.safetensors`` file or an existing one; a scale must be a plain decimal number (``0.8``,
    ``-1``, ``1e-1``; not ``1_0``, ``nan`` or ``inf``). Errors are one-line LoraErrors: a file
    not found, a scale that is not a number."""
    if not isinstance(spec, str) or not spec:
        raise LoraError(f"a LoRA is given as PATH[:SCALE], got {spec!r}")
    whole = Path(spec).expanduser()
    if whole.is_file():
        return whole, 1.0
    path, sep, text = spec.rpartition(":")
    if sep and path:
        file = Path(path).expanduser()
        if SCALE.fullmatch(text):
            scale = check_lora_scale(float(text), spec)
            if not file.is_file():
                raise LoraError(f"LoRA file not found: {path}")
            return file, scale
        if file.is_file() or file.suffix == ".safetensors":
            what = f"LoRA scale {text!r}" if text else "the LoRA scale after ':'"
            raise LoraError(f"{what} is not a number in {spec!r} (PATH[:SCALE], e.g. {path}:0.8)")
    raise LoraError(f"LoRA file not found: {spec}")


# ----------------------------------------------------------------------------- key layouts


# kohya flattens diffusers' module names, "." -> "_": put the dots back where names have none.
KOHYA_RULES = (
    (r"^transformer_blocks_(\d+)_", r"transformer_blocks.\1."),
    (r"\.attn_", ".attn."),
    (r"\.(img|txt)_(mod|mlp)_", r".\1_\2."),
    (r"\.net_(\d+)", r".net.\1"),
    (r"\.(\d+)_proj$", r".\1.proj"),
    (r"\.to_out_0$", ".to_out.0"),
    (r"^norm_out_linear$", "norm_out.linear"),
    (r"^time_text_embed_timestep_embedder_", "time_text_embed.timestep_embedder."),
)

# Prefixes trainers put before diffusers' module names.
PREFIX = re.compile(
    r"^(?:diffusion_model\.|model\.diffusion_model\.|transformer\.|base_model\.model\.)+"
)
KOHYA_PREFIX = "lora_unet_"

# <module>.<what>: the low-rank factors in three spellings, kohya's alpha, full deltas, DoRA.
KEY = re.compile(
    r"^(?P<module>.+?)\.(?:"
    r"(?P<factor>lora_A|lora_B|lora_down|lora_up|lora\.down|lora\.up)\.(?P<param>weight|bias)"
    r"|(?P<kind>alpha|diff|diff_b|dora_scale))$"
)
DOWN = {"lora_A", "lora_down", "lora.down"}

# Key fragments of LoRAs for other models, to say what a file is when its keys do not fit.
FOREIGN = (
    (re.compile(r"single_transformer_blocks|single_blocks|double_blocks|ff_context"), "Flux"),
    (re.compile(r"joint_blocks|context_block"), "Stable Diffusion 3"),
    (
        re.compile(r"down_blocks|up_blocks|mid_block|input_blocks|output_blocks"),
        "a Stable Diffusion UNet",
    ),
    (re.compile(r"(^|[._])blocks[._]\d+[._](self_attn|cross_attn)"), "Wan"),
    (re.compile(r"lora_te\d?_|text_encoder|text_model"), "a text encoder"),
    (re.compile(r"(^|[._])layers[._]\d+[._](attention|feed_forward)"), "Lumina / Z-Image"),
)


def diffusers_module(key_module: str) -> str:
    """A key's module part (prefixes, kohya flattening and all) -> diffusers' module name."""
    if key_module.startswith(KOHYA_PREFIX):
        return rename(key_module[len(KOHYA_PREFIX) :], KOHYA_RULES)
    return PREFIX.sub("", key_module)


def mlx_module(module: str) -> str:
    """diffusers module name -> this package's (``transformer_blocks.0.img_mlp.net.0.proj`` ->
    ``blocks.0.img_mlp.up``)."""
    return rename(module + ".", TRANSFORMER_RULES)[:-1]


# ----------------------------------------------------------------------------- LoRA files


@dataclass
class Update:
    """What one LoRA file adds to one weight: ``scale * up @ down`` (+ ``diff``)."""

    down: mx.array | None = None  # (rank, in)
    up: mx.array | None = None  # (out, rank)
    scale: float = 1.0  # alpha / rank
    diff: mx.array | None = None  # full delta, the weight's shape

    def delta(self) -> mx.array:
        """The full delta in float32 (before the user's scale)."""
        out = None
        if self.down is not None:
            out = (self.up.astype(F32) * self.scale) @ self.down.astype(F32)
        if self.diff is not None:
            d = self.diff.astype(F32)
            out = d if out is None else out + d
        return out

    def shape(self) -> tuple[int, ...]:
        if self.down is not None:
            return (self.up.shape[0], self.down.shape[1])
        return tuple(self.diff.shape)


@dataclass
class LoRA:
    """A LoRA file read and mapped onto this package's weight names."""

    path: str
    digest: str  # sha256 of the file
    updates: dict[str, Update]  # weight name ("blocks.0.attn.to_q.weight") -> update
    sources: dict[str, list[str]] = field(default_factory=dict)  # weight name -> file keys

    @property
    def name(self) -> str:
        return Path(self.path).name

    @property
    def rank(self) -> int:
        """Largest rank of its low-rank updates (0 when it has only full deltas)."""
        return max(
            (u.down.shape[0] for u in self.updates.values() if u.down is not None), default=0
        )

    def touches(self, pattern: str) -> bool:
        """True when one of its weights matches the regex ``pattern`` (e.g. ``_mod\\.``)."""
        return any(re.search(pattern, name) for name in self.updates)

    def check(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Raise LoraError unless every update lands on a weight of ``shapes`` with its shape."""
        missing = [n for n in self.updates if n not in shapes]
        if missing:
            keys = [k for n in missing for k in self.sources.get(n, [n])]
            raise LoraError(_unmatched_message(self.path, keys, len(self.updates)))
        wrong = [
            f"{n} (LoRA {u.shape()}, model {tuple(shapes[n])})"
            for n, u in self.updates.items()
            if tuple(u.shape()) != tuple(shapes[n])
        ]
        if wrong:
            raise LoraError(
                f"{self.path}: {len(wrong)} LoRA weight(s) do not fit the model's shapes (a LoRA "
                f"for another size of model?): {_listing(wrong)}"
            )


def _listing(items: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" ... and {len(items) - limit} more" if len(items) > limit else "")


def _unmatched_message(path: str, keys: list[str], total: int) -> str:
    text = " ".join(keys)
    for pattern, model in FOREIGN:
        if pattern.search(text):
            return (
                f"{path}: this looks like a LoRA for {model}, not Qwen-Image: "
                f"{len(keys)} key(s) match no transformer weight: {_listing(keys)}"
            )
    return (
        f"{path}: {len(keys)} LoRA key(s) match no Qwen-Image transformer weight: {_listing(keys)}"
    )


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _peft_alpha(metadata: dict) -> Callable[[str, int], float] | None:
    """PEFT's scale rule from diffusers' ``lora_adapter_metadata`` (lora_alpha, alpha_pattern,
    use_rslora), as a function of (diffusers module, rank); None without metadata."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        return None
    meta = {k.removeprefix("transformer."): v for k, v in meta.items()}
    if "lora_alpha" not in meta:
        return None
    alpha, patterns = float(meta["lora_alpha"]), dict(meta.get("alpha_pattern") or {})
    rslora = bool(meta.get("use_rslora", False))

    def scale(module: str, rank: int) -> float:
        a = alpha
        for pattern, value in patterns.items():  # PEFT matches a suffix of the module path
            if re.match(rf"(.*\.)?({pattern})$", module):
                a = float(value)
                break
        return a / (rank**0.5 if rslora else rank)

    return scale


def check_finite_tensors(path: str | Path, tensors: dict[str, mx.array]) -> None:
    """Raise LoraError naming the file and the keys whose values hold NaN or inf: such a LoRA
    would only show up as NaN latents at the first step."""
    names = [k for k, v in tensors.items() if mx.issubdtype(v.dtype, mx.floating)]
    flags = [mx.isfinite(tensors[k]).all() for k in names]
    mx.eval(flags)
    bad = [k for k, ok in zip(names, flags, strict=True) if not ok.item()]
    if bad:
        raise LoraError(
            f"{path}: {len(bad)} LoRA tensor(s) hold NaN or inf values: {_listing(bad)}"
        )


def read_lora(path: str | Path) -> LoRA:
    """Read a LoRA safetensors file in any supported layout (see the module docstring).

    Only the file's own structure is checked here (pairs complete, ranks agree); whether it
    fits a model is ``LoRA.check``'s job (done by ``fuse_weights`` and ``LoraStack``).
    """
    path = Path(path)
    if not path.is_file():
        raise LoraError(f"LoRA file not found: {path}")
    if path.suffix != ".safetensors":
        raise LoraError(f"{path}: only .safetensors LoRA files are supported")
    try:
        tensors, metadata = mx.load(str(path), return_metadata=True)
    except Exception as e:  # noqa: BLE001 - MLX raises several types for a bad file
        raise LoraError(f"{path}: cannot read the safetensors file: {e}") from e
    if not tensors:
        raise LoraError(f"{path}: the file holds no tensors")
    check_finite_tensors(path, tensors)

    parts: dict[str, dict[str, mx.array]] = {}  # diffusers module -> {role: tensor}
    keys_of: dict[str, list[str]] = {}
    unknown, dora = [], []
    for key, value in tensors.items():
        m = KEY.match(re.sub(r"(^|\.)default\.", r"\1", key))
        if not m:
            unknown.append(key)
            continue
        if m["kind"] == "dora_scale":
            dora.append(key)
            continue
        module = diffusers_module(m["module"])
        if m["factor"]:
            role = ("down" if m["factor"] in DOWN else "up") + (
                "" if m["param"] == "weight" else "_bias"
            )
        else:
            role = m["kind"]
        parts.setdefault(module, {})[role] = value
        keys_of.setdefault(module, []).append(key)
    if dora:  # diffusers drops these too (with a warning): the rest is a plain LoRA
        warnings.warn(
            f"{path}: DoRA magnitudes ignored ({len(dora)} dora_scale keys)", stacklevel=2
        )
    if unknown:
        raise LoraError(
            _unmatched_message(str(path), unknown, len(tensors)) + " (unknown key form)"
        )

    peft_scale = _peft_alpha(metadata or {})
    updates: dict[str, Update] = {}
    sources: dict[str, list[str]] = {}
    for module, p in parts.items():
        name = mlx_module(module)
        if ("down" in p) != ("up" in p):
            half = "down (lora_A)" if "down" in p else "up (lora_B)"
            raise LoraError(f"{path}: {module} has only its {half} factor")
        if "down_bias" in p:
            raise LoraError(f"{path}: {module} has a lora_A bias, which no LoRA trainer writes")
        if "down" in p:
            down, up = p["down"], p["up"]
            if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
                raise LoraError(
                    f"{path}: {module}: lora_A {tuple(down.shape)} and lora_B {tuple(up.shape)} "
                    "are not the factors of one linear"
                )
            rank = down.shape[0]
            if "alpha" in p:
                scale = float(p["alpha"].astype(F32).item()) / rank
            elif peft_scale is not None:
                scale = peft_scale(module, rank)
            else:
                scale = 1.0
            updates[f"{name}.weight"] = Update(down=down, up=up, scale=scale, diff=p.get("diff"))
            if "up_bias" in p:  # PEFT's lora_bias: scaled like the factors
                updates[f"{name}.bias"] = Update(diff=p["up_bias"].astype(F32) * scale)
        elif "diff" in p:
            updates[f"{name}.weight"] = Update(diff=p["diff"])
        if "diff_b" in p:
            if f"{name}.bias" in updates:
                raise LoraError(f"{path}: {module} has both lora_B.bias and diff_b")
            updates[f"{name}.bias"] = Update(diff=p["diff_b"])
        for target in (f"{name}.weight", f"{name}.bias"):
            if target in updates:
                sources[target] = keys_of[module]
    if not updates:
        raise LoraError(f"{path}: no LoRA weights in the file (only alphas or DoRA scales)")
    return LoRA(str(path), _file_digest(path), updates, sources)


def lora_key(loras: Iterable[tuple[LoRA, float]]) -> str:
    """A stable identity of a LoRA set (file contents and scales, in order): "" when empty."""
    items = [f"{lora.digest}:{float(scale)!r}" for lora, scale in loras]
    if not items:
        return ""
    return hashlib.sha256(";".join(items).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- fusing


def fold_delta(name: str, delta: mx.array, plan: PrecisionPlan | None) -> mx.array:
    """``delta`` as the weight ``name``'s fold under ``plan`` changes it (float32).

    Folds are affine (rows scaled, plus a constant on one modulation bias chunk), so the change
    of a folded weight is the linear part applied to the delta.
    """
    if plan is None or not plan.folded:
        return delta
    folded, changed = fold_weight(name, delta, plan)
    if not changed:
        return delta
    return folded - fold_weight(name, mx.zeros_like(delta), plan)[0]


def fused_weight(
    name: str,
    weight: mx.array,
    parts: Iterable[tuple[Update, float]],
    plan: PrecisionPlan | None = None,
) -> mx.array:
    """``float32(weight)`` plus every ``(update, scale)``'s delta, folded for ``plan``.

    Low-rank deltas go through one ``addmm`` each (the up factor scaled and row-folded: folds of
    a weight scale its rows), never a separate full-size delta.
    """
    w = weight.astype(F32)
    for update, scale in parts:
        if update.down is not None:
            up = fold_delta(name, update.up.astype(F32) * (update.scale * scale), plan)
            w = mx.addmm(w, up, update.down.astype(F32))
        if update.diff is not None:
            w = w + fold_delta(name, update.diff.astype(F32) * scale, plan)
    return w


def fuse_weights(
    weights: dict[str, mx.array],
    loras: Sequence[tuple[LoRA, float]],
    plan: PrecisionPlan | None = None,
) -> dict[str, mx.array]:
    """A copy of ``weights`` (MLX names) with ``loras`` (``(LoRA, scale)`` pairs) added.

    Each touched weight becomes ``float32(weight) + delta`` and stays float32, so that the
    precision plan ``from_weights`` applies folds and casts the exact sum. ``plan`` is the plan the
    weights are stored for (``PrecisionPlan.from_config``): for weights already folded (an fp16
    checkpoint) the delta is folded to match; None = unfolded.
    """
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    for lora, scale in loras:
        check_lora_scale(scale, lora.name)
        lora.check(shapes)
    out = dict(weights)
    for name in dict.fromkeys(n for lora, _ in loras for n in lora.updates):
        parts = [(lora.updates[name], s) for lora, s in loras if name in lora.updates]
        out[name] = fused_weight(name, weights[name], parts, plan)
    return out


# ----------------------------------------------------------------------------- side path


class LoraLinear(nn.Module):
    """A quantized linear with low-rank updates run beside it (mlx-lm's way):
    ``y = linear(x) + (x @ lora_a) @ lora_b`` (+ ``x @ delta.T`` for full deltas).

    The scales (alpha / rank, the user's, the plan's folds) are in ``lora_b``; several LoRAs
    stack along the rank. Factors are stored in the linear's compute dtype.
    """

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.linear = linear
        self.lora_a: mx.array | None = None  # (in, R)
        self.lora_b: mx.array | None = None  # (R, out)
        self.delta: mx.array | None = None  # (out, in)

    @property
    def scales(self) -> mx.array:  # what precision.compute_dtype reads
        return self.linear.scales

    def add(self, down: mx.array, up: mx.array) -> None:
        """Add ``up @ down`` (up already scaled) as more rank."""
        dtype = self.linear.scales.dtype
        a, b = down.T.astype(dtype), up.T.astype(dtype)
        if self.lora_a is not None:
            a = mx.concatenate([self.lora_a, a], axis=1)
            b = mx.concatenate([self.lora_b, b], axis=0)
        self.lora_a, self.lora_b = a, b

    def add_dense(self, delta: mx.array) -> None:
        delta = delta.astype(F32) if self.delta is None else self.delta.astype(F32) + delta
        self.delta = delta.astype(self.linear.scales.dtype)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        if self.lora_a is not None:
            y = y + ((x @ self.lora_a) @ self.lora_b).astype(y.dtype)
        if self.delta is not None:
            y = y + (x @ self.delta.T).astype(y.dtype)
        return y


def _quantized(module: nn.Module) -> bool:
    return isinstance(module, nn.QuantizedLinear)


def _quantized_shape(module: nn.QuantizedLinear) -> tuple[int, int]:
    out, packed = module.weight.shape
    return (out, packed * 32 // module.bits)


def _children(module: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """(name, child module) pairs, list items named by index."""
    for key, value in module.items():
        if isinstance(value, nn.Module):
            yield key, value
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if isinstance(item, nn.Module):
                    yield f"{key}.{i}", item


def _walk(module: nn.Module, prefix: str = "") -> Iterable[tuple[str, nn.Module]]:
    """(path, module) for every module, a LoraLinear standing for the linear it wraps."""
    yield prefix.rstrip("."), module
    if isinstance(module, LoraLinear):
        return
    for name, child in _children(module):
        yield from _walk(child, f"{prefix}{name}.")


def target_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Weight name -> shape of every weight a LoRA may touch (quantized ones as if unpacked)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path, module in _walk(model):
        base = module.linear if isinstance(module, LoraLinear) else module
        for key, value in base.items():
            if not isinstance(value, mx.array):
                continue
            if _quantized(base) and key in ("scales", "biases"):
                continue
            shape = _quantized_shape(base) if _quantized(base) and key == "weight" else value.shape
            shapes[f"{path}.{key}" if path else key] = tuple(shape)
    return shapes


def _resolve(model: nn.Module, path: str) -> tuple[nn.Module, str, nn.Module]:
    """(parent, attribute or index, module) for the module at ``path``."""
    parent, key, module = None, "", model
    for part in path.split(".") if path else []:
        parent, key = module, part
        module = module[int(part)] if isinstance(module, list) else getattr(module, part)
    return parent, key, module


def _set_child(parent, key: str, child: nn.Module) -> None:
    if isinstance(parent, list):
        parent[int(key)] = child
    else:
        setattr(parent, key, child)


class LoraStack:
    """The LoRAs applied to a loaded transformer, stackable and removable.

    ``reload(names)`` returns the original weights ``names`` as the model stores them (its plan's
    dtype and folds); without it the weights a LoRA fuses into are copied before the first change
    (memory: one copy of every touched float weight) unless ``keep_originals=False``, which
    saves that memory and makes ``clear`` refuse (the pipeline drops the model instead).
    """

    def __init__(
        self,
        model: nn.Module,
        reload: Callable[[list[str]], dict[str, mx.array]] | None = None,
        keep_originals: bool = True,
    ):
        self.model = model
        self.reload = reload
        self.keep_originals = keep_originals
        self.loras: list[tuple[LoRA, float]] = []
        self._fused: set[str] = set()
        self._originals: dict[str, mx.array] = {}
        self._wrapped: set[str] = set()

    @property
    def plan(self) -> PrecisionPlan | None:
        return getattr(self.model, "plan", None)

    def key(self) -> str:
        """Identity of the applied set (see ``lora_key``): part of any cache of model outputs."""
        return lora_key(self.loras)

    def touches(self, pattern: str) -> bool:
        return any(lora.touches(pattern) for lora, _ in self.loras)

    def add(self, lora: LoRA, scale: float = 1.0) -> None:
        """Apply one more LoRA at ``scale``: fused into float weights, beside quantized ones."""
        scale = check_lora_scale(scale, lora.name)
        lora.check(target_shapes(self.model))
        retrace = False
        for name, update in lora.updates.items():
            path, param = name.rsplit(".", 1)
            parent, key, module = _resolve(self.model, path)
            base = module.linear if isinstance(module, LoraLinear) else module
            if param == "weight" and _quantized(base):
                if not isinstance(module, LoraLinear):
                    module = LoraLinear(base)
                    _set_child(parent, key, module)
                    self._wrapped.add(path)
                if update.down is not None:
                    up = fold_delta(name, update.up.astype(F32) * (update.scale * scale), self.plan)
                    module.add(update.down, up)
                if update.diff is not None:
                    module.add_dense(fold_delta(name, update.diff.astype(F32) * scale, self.plan))
                mx.eval([a for a in (module.lora_a, module.lora_b, module.delta) if a is not None])
                retrace = True
                continue
            current = base[param]
            if name not in self._fused and self.reload is None and self.keep_originals:
                self._originals[name] = current
            self._fused.add(name)
            new = fused_weight(name, current, [(update, scale)], self.plan).astype(current.dtype)
            mx.eval(new)  # one weight at a time: float32 temporaries stay one weight's size
            setattr(base, param, new)
        self.loras.append((lora, scale))
        if retrace:
            self._retrace()

    def _retrace(self) -> None:
        """A compiled model bakes in module types and its inputs' structure: trace again."""
        compiled = getattr(self.model, "compiled", None)
        if compiled is not None and hasattr(self.model, "compile"):
            self.model.compile(compiled.enabled)

    def clear(self) -> None:
        """Remove every LoRA: unwrap side paths and restore the fused weights."""
        if self._fused and self.reload is None and not self.keep_originals:
            raise LoraError("the original weights were not kept: reload the model instead")
        for path in sorted(self._wrapped):
            parent, key, module = _resolve(self.model, path)
            _set_child(parent, key, module.linear)
        if self._fused:
            names = sorted(self._fused)
            originals = self.reload(names) if self.reload else self._originals
            missing = [n for n in names if n not in originals]
            if missing:
                raise LoraError(f"cannot restore weights {_listing(missing)}: not reloaded")
            for name in names:
                path, param = name.rsplit(".", 1)
                _, _, module = _resolve(self.model, path)
                setattr(module, param, originals[name])
            mx.eval([originals[n] for n in names])
        if self._wrapped:
            self._retrace()
        self._fused.clear()
        self._originals.clear()
        self._wrapped.clear()
        self.loras = []
