"""The adaLN cache: every sigma-only vector of a sampling run, computed once and kept on disk.

Each block's ``img_mod``/``txt_mod`` output and the output norm's depend on sigma alone (the
conditioning vector is the timestep embedding only). For a given transformer, LoRA set and exact
sigma schedule they are computed once, streaming the modulation weights one block at a time
(``mx.load`` is lazy: only the tensors evaluated are read from disk), and stored under
``$QWEN_MLX_CACHE/adaln/<key>.safetensors``. From then on the transformer is loaded without its
6.8 B modulation parameters (``QwenImageTransformer.from_weights(..., modulation=False)``) and
runs from the table, one step's vectors at a time.

The vectors are computed exactly as the transformer computes them (same folded and cast weights,
same ``run_linear``, one sigma at a time) and stored in the dtype they come out in, so a cached
run is bit-identical to an uncached one.

File: one safetensors file per key, tensors ``<step>.img`` / ``<step>.txt`` (blocks, 6*dim) and
``<step>.out`` (2*dim); its metadata holds the key, the counts and a digest of every tensor, so a
truncated or corrupt file is detected (and rebuilt by ``AdaLNCache.get``). Written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from qwen_mlx import cache
from qwen_mlx.models.transformer import (
    MODULATION_WEIGHTS,
    Modulation,
    TimestepEmbedder,
    TransformerConfig,
    planned_weight,
)
from qwen_mlx.precision import PrecisionPlan, run_linear
from qwen_mlx.quantize import (
    GROUP_SIZE,
    QuantizationPlan,
    linear_from_weights,
    quantize_weights,
)

FORMAT = 1


def cache_root() -> Path:
    """``$QWEN_MLX_CACHE/adaln`` (default ``~/.cache/qwen-mlx/adaln``)."""
    return cache.cache_root() / "adaln"


_WARNED: set[str] = set()  # cache folders already warned about (once per process each)


# ----------------------------------------------------------------------------- keys


def weights_identity(folder: str | Path) -> str:
    """Identity of a component folder's weights: each weight file's name, size and mtime, and
    the config.json text (cheap: nothing is read but metadata and the config)."""
    folder = Path(folder)
    h = hashlib.sha256()
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {folder}")
    for path in files:
        st = path.stat()
        h.update(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    config = folder / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    return h.hexdigest()


def timestep_bytes(timesteps: Iterable[float] | mx.array) -> np.ndarray:
    """The timesteps (sigma in [0, 1]) as the float32 values the transformer receives."""
    if isinstance(timesteps, mx.array):
        return np.array(timesteps.astype(mx.float32)).reshape(-1)
    return np.asarray(list(timesteps), dtype=np.float32).reshape(-1)


def cache_key(
    weights_id: str,
    plan: PrecisionPlan,
    timesteps: Iterable[float] | mx.array,
    lora: str = "",
    extra: dict | None = None,
) -> str:
    """The cache key: weights, precision plan, LoRA set (identity and scales), exact timesteps,
    plus anything else that changes the weights (``extra``, e.g. quantize-at-load bits)."""
    payload = {
        "format": FORMAT,
        "weights": weights_id,
        "plan": plan.to_dict(),
        "lora": lora,
        "timesteps": timestep_bytes(timesteps).tobytes().hex(),
        "extra": extra or {},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


# ----------------------------------------------------------------------------- computing


def _take(weights: dict[str, mx.array], prefix: str) -> dict[str, mx.array]:
    """Pop every ``prefix.*`` tensor (so nothing keeps it once it has been used)."""
    names = [k for k in weights if k.startswith(prefix + ".")]
    if not names:
        raise KeyError(f"no weights for {prefix} (needed for the adaLN table)")
    return {k[len(prefix) + 1 :]: weights.pop(k) for k in names}


def compute_modulation(
    config: TransformerConfig,
    weights: dict[str, mx.array],
    stored: PrecisionPlan,
    plan: PrecisionPlan,
    timesteps: Sequence[float] | mx.array,
    group_size: int = GROUP_SIZE,
    quantize: QuantizationPlan | None = None,
    loras: Sequence[tuple] = (),
) -> list[Modulation]:
    """One ``Modulation`` (batch 1) per timestep, streaming one layer's weights at a time.

    ``weights``: the transformer's converted weights as stored (lazy arrays, e.g. from
    ``mx.load``), folded for ``stored``; the modulation weights are popped from it as they are
    used. ``plan``: the plan the transformer runs under (as ``apply_plan`` would apply it).
    ``quantize``: quantize float weights as ``from_weights(..., quantize=...)`` would.
    ``loras``: ``(LoRA, scale)`` pairs applied to the built layers as ``lora.LoraStack`` applies
    them to a loaded model (beside quantized linears); LoRAs on float weights are fused into
    ``weights`` beforehand (``lora.fuse_weights``), as the pipeline fuses them at load.
    """
    fold = not stored.same_folds(plan)
    quantized = any(k.endswith(".scales") for k in weights if MODULATION_WEIGHTS.match(k))
    if fold and (stored.folded or (plan.folded and quantized)):
        raise ValueError(
            f"weights stored for the {stored.name!r} plan cannot be refolded for {plan.name!r}"
        )

    if quantize is not None and quantized:
        quantize = None  # already quantized on disk
    size = quantize.group_size if quantize is not None else group_size

    def bits_for(path: str, shape: tuple[int, ...]) -> int | None:
        return quantize.bits_for(path, shape, config.num_layers)

    def layer(prefix: str) -> nn.Module:
        raw = _take(weights, prefix)
        prepared = {}
        for k, v in raw.items():
            prepared[f"{prefix}.{k}"] = planned_weight(f"{prefix}.{k}", v, plan, fold)
        if quantize is not None:  # as quantize_stream would at load
            prepared = quantize_weights(prepared, bits_for, size)
        linear = linear_from_weights({k[len(prefix) + 1 :]: v for k, v in prepared.items()}, size)
        return with_loras(prefix, linear, loras, plan)

    sigmas = [mx.array([t], dtype=mx.float32) for t in timestep_bytes(timesteps).tolist()]
    embed = TimestepEmbedder(config.inner_dim)
    embed.linear_1, embed.linear_2 = layer("time_embed.linear_1"), layer("time_embed.linear_2")
    temb_act = [nn.silu(embed(s)) for s in sigmas]
    mx.eval(temb_act)
    del embed

    blocks: list[list[tuple[mx.array, mx.array]]] = [[] for _ in sigmas]
    for i in range(config.num_layers):
        img_mod, txt_mod = layer(f"blocks.{i}.img_mod"), layer(f"blocks.{i}.txt_mod")
        for step, t in enumerate(temb_act):
            blocks[step].append((run_linear(img_mod, t), run_linear(txt_mod, t)))
        mx.eval([m for step in blocks for m in step[i]])
        del img_mod, txt_mod  # this block's weights go before the next block's are read
    if any(k.startswith("norm_out.linear.") for k in weights):
        norm = layer("norm_out.linear")
        outs = [run_linear(norm, t) for t in temb_act]
    else:  # a ControlNet: blocks only, no output norm
        outs = [mx.zeros((1, 0), dtype=mx.float32) for _ in temb_act]
    mx.eval(outs)
    return [Modulation(b, o) for b, o in zip(blocks, outs, strict=True)]


def with_loras(path: str, linear: nn.Module, loras: Sequence[tuple], plan: PrecisionPlan):
    """``linear`` (the layer at ``path``) with the LoRA updates that touch it, applied by a
    ``LoraStack`` on a module tree holding just this layer, so the result is what the stack
    gives the whole model."""
    from qwen_mlx.lora import LoraStack

    touched = []
    for lora, scale in loras:
        updates = {k: u for k, u in lora.updates.items() if k.startswith(path + ".")}
        if updates:
            touched.append((replace(lora, updates=updates), scale))
    if not touched:
        return linear
    root = node = nn.Module()
    parts = path.split(".")
    for i, part in enumerate(parts):
        child = linear if i == len(parts) - 1 else nn.Module()
        if isinstance(node, list):
            node.extend(nn.Module() for _ in range(int(part) + 1 - len(node)))
            node[int(part)] = child
        else:
            if i + 1 < len(parts) and parts[i + 1].isdigit():
                child = []  # e.g. "blocks": a list of modules
            setattr(node, part, child)
        node = child
    root.plan = plan
    stack = LoraStack(root, keep_originals=False)
    for lora, scale in touched:
        stack.add(lora, scale)
    node = root
    for part in parts:
        node = node[int(part)] if isinstance(node, list) else getattr(node, part)
    return node


# ----------------------------------------------------------------------------- storage


def _digest(arrays: Iterable[tuple[str, mx.array]]) -> str:
    """A digest of tensors (names, dtypes, shapes, bytes), evaluated one at a time."""
    h = hashlib.blake2b(digest_size=16)
    for name, a in arrays:
        h.update(f"{name}\0{a.dtype}\0{tuple(a.shape)}\n".encode())
        h.update(np.array(a.reshape(-1).view(mx.uint8)).tobytes())
    return h.hexdigest()


def _step_arrays(step: int, mod: Modulation) -> dict[str, mx.array]:
    return {
        f"{step}.img": mx.concatenate([img for img, _ in mod.blocks]),
        f"{step}.txt": mx.concatenate([txt for _, txt in mod.blocks]),
        f"{step}.out": mod.out.reshape(-1),
    }


class AdaLNTable:
    """A verified cache file; ``table[i]`` is step i's ``Modulation`` (batch 1), read from disk
    when asked for, so only one step's vectors need be resident."""

    def __init__(self, path: Path, num_steps: int, num_layers: int):
        self.path, self.num_steps, self.num_layers = path, num_steps, num_layers

    def __len__(self) -> int:
        return self.num_steps

    def __getitem__(self, step: int) -> Modulation:
        if not 0 <= step < self.num_steps:
            raise IndexError(f"step {step} out of range for {self.num_steps} steps")
        arrays = mx.load(str(self.path))  # lazy: only this step's tensors are read
        img, txt = arrays[f"{step}.img"], arrays[f"{step}.txt"]
        blocks = [(img[i : i + 1], txt[i : i + 1]) for i in range(self.num_layers)]
        return Modulation(blocks, arrays[f"{step}.out"][None])


class CorruptCacheError(ValueError):
    """A cache file that does not hold what its name and metadata promise."""


class AdaLNCache:
    """Modulation tables on disk, keyed by ``cache_key``."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else cache_root()
        self._verified: set[tuple[str, int, int]] = set()

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def open(self, key: str) -> AdaLNTable | None:
        """The table for ``key``; None if there is none; ``CorruptCacheError`` if the file is
        damaged (unreadable, truncated, or its tensors do not match their digest)."""
        path = self.path(key)
        if not path.is_file():
            return None
        st = path.stat()
        stamp = (str(path), st.st_size, st.st_mtime_ns)
        try:
            arrays, meta = mx.load(str(path), return_metadata=True)
        except Exception as e:  # noqa: BLE001 - MLX raises several types for corrupt files
            raise CorruptCacheError(f"{path}: unreadable ({e})") from e
        try:
            steps, layers = int(meta["steps"]), int(meta["layers"])
            if meta.get("key") != key or int(meta.get("format", -1)) != FORMAT:
                raise CorruptCacheError(f"{path}: written for another key or format")
            expected = {f"{s}.{part}" for s in range(steps) for part in ("img", "txt", "out")}
            if set(arrays) != expected:
                raise CorruptCacheError(f"{path}: wrong set of tensors")
            if stamp not in self._verified:
                names = sorted(arrays)
                if _digest((n, arrays[n]) for n in names) != meta["digest"]:
                    raise CorruptCacheError(f"{path}: contents do not match their digest")
        except CorruptCacheError:
            raise
        except Exception as e:  # noqa: BLE001 - missing metadata, short reads, bad values
            raise CorruptCacheError(f"{path}: damaged ({e})") from e
        self._verified.add(stamp)
        return AdaLNTable(path, steps, layers)

    def save(self, key: str, table: Sequence[Modulation]) -> AdaLNTable:
        """Write ``table`` for ``key`` atomically (a temporary file renamed into place)."""
        self.root.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, mx.array] = {}
        for step, mod in enumerate(table):
            arrays.update(_step_arrays(step, mod))
        mx.eval(arrays)
        meta = {
            "format": str(FORMAT),
            "key": key,
            "steps": str(len(table)),
            "layers": str(len(table[0].blocks)),
            "digest": _digest((n, arrays[n]) for n in sorted(arrays)),
        }
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".safetensors", dir=self.root)
        os.close(fd)
        try:
            mx.save_safetensors(tmp, arrays, metadata=meta)
            os.replace(tmp, self.path(key))
        finally:
            Path(tmp).unlink(missing_ok=True)
        return self.open(key)

    def get(
        self, key: str, build: Callable[[], Sequence[Modulation]]
    ) -> AdaLNTable | Sequence[Modulation]:
        """The table for ``key``, built with ``build()`` and saved if missing or corrupt; when
        the cache folder cannot be written (``$QWEN_MLX_CACHE`` names a file, no permission, a
        full disk) the built table is returned from memory, with one warning per folder."""
        try:
            table = self.open(key)
        except CorruptCacheError as e:
            warnings.warn(f"adaLN cache: {e}; rebuilding it", stacklevel=2)
            self.path(key).unlink(missing_ok=True)
            table = None
        if table is None:
            built = build()
            try:
                table = self.save(key, built)
            except OSError as e:  # the cache is optional: run from memory, say so once
                where = str(self.root)
                if where not in _WARNED:
                    _WARNED.add(where)
                    why = e.strerror or str(e)
                    blocker = next((p for p in (self.root, *self.root.parents) if p.exists()), None)
                    if blocker is not None and not blocker.is_dir():
                        why = f"{blocker} is a file, not a folder"
                    warnings.warn(
                        f"adaLN cache: cannot write in {where} ({why}; {cache.setting()}); "
                        "running without the cache",
                        stacklevel=2,
                    )
                return list(built)
        return table
