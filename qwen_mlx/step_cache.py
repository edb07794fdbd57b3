"""Step caches: First-Block Cache, TaylorSeer and MagCache, deciding as diffusers' hooks do.

Each config takes diffusers' field names and defaults (``diffusers.hooks``). diffusers runs true
CFG as two transformer calls, each in its own cache context (``"cond"``, ``"uncond"``) with its own
state; we batch both branches in one call, so every decision and every cached tensor here is kept
per branch (a contiguous block of batch rows: cond first), and a step computes only the rows of
the branches that need a full pass. A ``StepCacheRun`` holds one image's state (diffusers resets
its hooks after each pipeline call); the denoising loop calls it in place of the transformer.

MagCache needs magnitude ratios measured on the checkpoint and schedule: ``calibrate=True`` runs
uncached, measures them per branch, and the pipeline stores them under
``$QWEN_MLX_CACHE/magcache`` (``save_calibration``) where later runs find them.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from qwen_mlx import loading
from qwen_mlx.errors import QwenMLXError, RequestError

BRANCHES = ("cond", "uncond")
F32 = np.float32


# ----------------------------------------------------------------------------- configs


@dataclass
class FirstBlockCacheConfig:
    """First-Block Cache: run block 0; when its image-stream residual moved by at most
    ``threshold`` (mean |r - r_prev| / mean |r_prev|, against the last full pass), add the last
    full pass's residual of the remaining blocks instead of running them."""

    threshold: float = 0.05

    def __post_init__(self) -> None:
        _check(self.threshold >= 0, f"threshold must be >= 0, got {self.threshold}")


@dataclass
class TaylorSeerCacheConfig:
    """TaylorSeer: full passes during the first ``disable_cache_before_step`` steps and then every
    ``cache_interval`` steps; in between, each cached output is a Taylor expansion (order up to
    ``max_order``, divided differences over past full passes). By default the cached outputs are
    every block's attention (diffusers' default); ``use_lite_mode`` caches the model's output
    instead, skipping whole passes. ``taylor_factors_dtype`` (None: the output's dtype) stores
    the factors, bfloat16 as in diffusers."""

    cache_interval: int = 5
    disable_cache_before_step: int = 3
    disable_cache_after_step: int | None = None
    max_order: int = 1
    taylor_factors_dtype: mx.Dtype | None = mx.bfloat16
    use_lite_mode: bool = False

    def __post_init__(self) -> None:
        _check(self.cache_interval >= 1, f"cache_interval must be >= 1, got {self.cache_interval}")
        _check(
            self.disable_cache_before_step >= 0,
            f"disable_cache_before_step must be >= 0, got {self.disable_cache_before_step}",
        )
        _check(
            self.disable_cache_after_step is None or self.disable_cache_after_step >= 0,
            f"disable_cache_after_step must be >= 0, got {self.disable_cache_after_step}",
        )
        _check(self.max_order >= 0, f"max_order must be >= 0, got {self.max_order}")


@dataclass
class MagCacheConfig:
    """MagCache: after the first ``retention_ratio`` of the steps, skip a step (output = input +
    the last full pass's residual) while the accumulated error of the magnitude ratios stays
    within ``threshold`` and at most ``max_skip_steps`` steps in a row.

    ``mag_ratios``: one ratio per step (a list for every branch, or ``{"cond": [...],
    "uncond": [...]}``), interpolated to the step count as diffusers does; None: the ratios
    stored by an earlier ``calibrate=True`` run of this checkpoint and schedule.
    ``num_inference_steps``: None means the run's own step count (diffusers: 28, to be set)."""

    threshold: float = 0.06
    max_skip_steps: int = 3
    retention_ratio: float = 0.2
    num_inference_steps: int | None = None
    mag_ratios: Sequence[float] | dict[str, Sequence[float]] | None = None
    calibrate: bool = False

    def __post_init__(self) -> None:
        _check(self.threshold >= 0, f"threshold must be >= 0, got {self.threshold}")
        _check(self.max_skip_steps >= 0, f"max_skip_steps must be >= 0, got {self.max_skip_steps}")
        _check(
            0 <= self.retention_ratio <= 1,
            f"retention_ratio must be in [0, 1], got {self.retention_ratio}",
        )
        _check(
            self.num_inference_steps is None or self.num_inference_steps >= 1,
            f"num_inference_steps must be >= 1, got {self.num_inference_steps}",
        )
        if self.mag_ratios is not None:
            ratios = self.mag_ratios
            lists = ratios.values() if isinstance(ratios, dict) else [ratios]
            for r in lists:
                r = np.asarray(r, dtype=np.float64).reshape(-1)
                _check(
                    r.size > 0 and np.isfinite(r).all() and (r > 0).all(),
                    "mag_ratios must be positive finite numbers",
                )


StepCacheConfig = FirstBlockCacheConfig | TaylorSeerCacheConfig | MagCacheConfig
METHODS = {
    "fbcache": (FirstBlockCacheConfig, "threshold", float),
    "taylorseer": (TaylorSeerCacheConfig, "cache_interval", int),
    "taylorseer-lite": (TaylorSeerCacheConfig, "cache_interval", int),
    "magcache": (MagCacheConfig, "threshold", float),
}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise RequestError(message)


def parse_spec(spec: str | None, calibrate: bool = False) -> StepCacheConfig | None:
    """A config from the CLI's ``--cache`` value: ``fbcache[:THRESHOLD]``,
    ``taylorseer[:INTERVAL]``, ``taylorseer-lite[:INTERVAL]``, ``magcache[:THRESHOLD]``;
    ``--cache-calibrate`` alone means ``magcache``. None: no cache."""
    if spec is None:
        return MagCacheConfig(calibrate=True) if calibrate else None
    name, _, value = spec.strip().lower().partition(":")
    if name not in METHODS:
        raise RequestError(f"unknown cache {name!r}: use one of {', '.join(METHODS)}")
    if calibrate and name != "magcache":
        raise RequestError("--cache-calibrate is for --cache magcache")
    cls, field, kind = METHODS[name]
    kw: dict = {}
    if value:
        try:
            kw[field] = kind(value)
        except ValueError:
            raise RequestError(f"--cache {name}: {field} must be a number, got {value!r}") from None
    if name == "taylorseer-lite":
        kw["use_lite_mode"] = True
    if name == "magcache":
        kw["calibrate"] = calibrate
    return cls(**kw)


def describe(config: StepCacheConfig) -> str:
    """A short name with the main setting, e.g. ``fbcache:0.05`` (summary line, metadata)."""
    if isinstance(config, FirstBlockCacheConfig):
        return f"fbcache:{config.threshold:g}"
    if isinstance(config, TaylorSeerCacheConfig):
        lite = "-lite" if config.use_lite_mode else ""
        return f"taylorseer{lite}:{config.cache_interval}"
    if isinstance(config, MagCacheConfig):
        return "magcache:calibrate" if config.calibrate else f"magcache:{config.threshold:g}"
    raise TypeError(f"not a step cache config: {config!r}")


# ----------------------------------------------------------------------------- MagCache ratios


def nearest_interp(ratios: Sequence[float], length: int) -> np.ndarray:
    """``ratios`` resampled to ``length`` by nearest index (diffusers' ``nearest_interp``)."""
    src = np.asarray(ratios, dtype=F32).reshape(-1)
    if length == 1:
        return src[-1:]
    scale = F32((len(src) - 1) / (length - 1))
    idx = np.round(np.arange(length, dtype=F32) * scale).astype(np.int64)  # half to even
    return src[idx]


def calibration_root() -> Path:
    """``$QWEN_MLX_CACHE/magcache`` (default ``~/.cache/qwen-mlx/magcache``)."""
    return loading.cache_root().expanduser() / "magcache"


def calibration_key(weights_id: str, timesteps: Sequence[float], branches: int, lora: str = ""):
    """What the ratios depend on: the weights (and LoRAs), the exact schedule, CFG on or off."""
    payload = {
        "weights": weights_id,
        "lora": lora,
        "timesteps": np.asarray(timesteps, dtype=F32).tobytes().hex(),
        "branches": branches,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def load_calibration(key: str) -> dict[str, list[float]] | None:
    path = calibration_root() / f"{key}.json"
    if not path.is_file():
        return None
    try:
        return {k: [float(v) for v in r] for k, r in json.loads(path.read_text())["ratios"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None  # a damaged file is measured again


def save_calibration(key: str, ratios: dict[str, list[float]], info: dict | None = None) -> Path:
    """Write the ratios atomically (a temp file renamed into place)."""
    root = calibration_root()
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{key}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"format": 1, "ratios": ratios, **(info or {})}, indent=1))
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------- state


class TaylorState:
    """One cached module's Taylor factors (diffusers' ``TaylorSeerState``)."""

    def __init__(self, max_order: int, dtype: mx.Dtype | None):
        self.max_order, self.dtype = max_order, dtype
        self.factors: list[list[mx.array]] = []  # per output: order 0..k
        self.dtypes: list[mx.Dtype] = []
        self.last_update: int | None = None

    def update(self, outputs: Sequence[mx.array], step: int) -> None:
        if self.last_update == step:
            raise ValueError("TaylorSeer: two updates at one step")
        self.dtypes = [o.dtype for o in outputs]
        new_all = []
        for i, features in enumerate(outputs):
            new = [features]
            if self.last_update is not None:
                delta = step - self.last_update
                prev = self.factors[i] if i < len(self.factors) else []
                for j in range(min(self.max_order, len(prev))):
                    if prev[j].shape != new[j].shape:
                        break
                    new.append((new[j] - prev[j].astype(features.dtype)) / delta)
            store = self.dtype or features.dtype
            new_all.append([f.astype(store) for f in new])
        self.factors = new_all
        self.last_update = step

    def predict(self, step: int) -> list[mx.array]:
        if self.last_update is None:
            raise ValueError("TaylorSeer: a prediction before any full pass")
        offset = step - self.last_update
        outputs = []
        for factors, dtype in zip(self.factors, self.dtypes, strict=True):
            out = mx.zeros(factors[0].shape, dtype=dtype)
            for order, f in enumerate(factors):
                out = out + f.astype(dtype) * ((offset**order) / math.factorial(order))
            outputs.append(out)
        return outputs


class _FBCState:
    def __init__(self) -> None:
        self.head_residual: mx.array | None = None
        self.tail_residual: mx.array | None = None


class _MagState:
    def __init__(self) -> None:
        self.previous_residual: mx.array | None = None
        self.step_index = 0
        self.calibration: list[float] = []
        self.reset_accumulators()

    def reset_accumulators(self) -> None:
        self.ratio, self.err, self.steps = F32(1.0), F32(0.0), 0


# ----------------------------------------------------------------------------- the run


class StepCacheRun:
    """One image's step cache. ``run(model, x, *args, **kwargs)`` replaces the per-step
    ``model(x, *args, **kwargs)``; the batch holds ``branches`` equal blocks of rows (cond, then
    uncond). ``mag_ratios``: resolved ratios per branch name (MagCache without calibrate).
    ``only``: the one branch this process computes (``--parallel cfg``): each branch decides on
    its own, so the pair of processes skips exactly what one process would."""

    def __init__(
        self,
        config: StepCacheConfig,
        num_steps: int,
        branches: int = 1,
        mag_ratios: dict[str, Sequence[float]] | None = None,
        only: str | None = None,
    ):
        if not 1 <= branches <= len(BRANCHES):
            raise ValueError(f"branches must be 1 or 2, got {branches}")
        if only is not None and (branches != 2 or only not in BRANCHES):
            raise ValueError(f"only: one of {BRANCHES} of a 2-branch run, got {only!r}")
        self.config, self.num_steps = config, num_steps
        self.names = BRANCHES[:branches] if only is None else (only,)
        self.full_passes = dict.fromkeys(self.names, 0)
        self.calls = 0
        self.calibrated: dict[str, list[float]] = {}
        if isinstance(config, FirstBlockCacheConfig):
            self.fbc = {n: _FBCState() for n in self.names}
        elif isinstance(config, TaylorSeerCacheConfig):
            self.taylor: dict = {}  # key -> TaylorState (batched: its decisions are per step only)
            self.step = -1
        elif isinstance(config, MagCacheConfig):
            self.mag = {n: _MagState() for n in self.names}
            self.mag_steps = config.num_inference_steps or num_steps
            self.ratios: dict[str, np.ndarray] = {}
            if not config.calibrate:
                given = mag_ratios if mag_ratios is not None else config.mag_ratios
                if given is None:
                    raise QwenMLXError(
                        "MagCache needs magnitude ratios for this checkpoint and schedule: run "
                        "once with calibrate=True (CLI: --cache magcache --cache-calibrate)"
                    )
                for n in self.names:
                    r = given.get(n, given.get("cond")) if isinstance(given, dict) else given
                    if r is None:
                        raise QwenMLXError(f"MagCache ratios have no {n!r} branch")
                    r = np.asarray(r, dtype=F32).reshape(-1)
                    self.ratios[n] = (
                        r if len(r) == self.mag_steps else nearest_interp(r, self.mag_steps)
                    )
        else:
            raise TypeError(f"not a step cache config: {config!r}")

    # -- reporting

    @property
    def passes(self) -> int:
        """Transformer passes (per branch) the uncached loop would have run."""
        return self.calls * len(self.names)

    @property
    def total_full_passes(self) -> int:
        return sum(self.full_passes.values())

    def summary(self) -> str:
        return f"{describe(self.config)} {self.total_full_passes}/{self.passes} full passes"

    # -- the step

    def _rows(self, batch: int) -> list[mx.array]:
        if batch % len(self.names):
            raise ValueError(f"batch {batch} does not split into {len(self.names)} branches")
        per = batch // len(self.names)
        return [mx.arange(k * per, (k + 1) * per) for k in range(len(self.names))]

    def __call__(self, model: Callable, x: mx.array, *args, **kwargs) -> mx.array:
        self.calls += 1
        cfg = self.config
        if isinstance(cfg, TaylorSeerCacheConfig):
            return self._taylor(model, x, *args, **kwargs)
        rows = self._rows(x.shape[0])
        hook = self._fbc if isinstance(cfg, FirstBlockCacheConfig) else self._mag
        return model(
            x, *args, blocks_hook=lambda img, txt, run: hook(img, txt, run, rows), **kwargs
        )

    def _compute(self, run_blocks, img, txt, rows, compute, start):
        """Run blocks ``start``.. on the rows of the computing branches; returns per-branch
        image outputs (None for skipped branches)."""
        picked = [r for r, c in zip(rows, compute, strict=True) if c]
        if not picked:
            return [None] * len(rows)
        sel = None if len(picked) == len(rows) else mx.concatenate(picked)
        if sel is not None:
            img, txt = img[sel], txt[sel]
        out = run_blocks(img, txt, start, None, sel)[0]
        result, at = [], 0
        for r, c in zip(rows, compute, strict=True):
            result.append(out[at : at + r.size] if c else None)
            at += r.size if c else 0
        return result

    # First-Block Cache: diffusers' FBCHeadBlockHook / FBCBlockHook, per branch.
    def _fbc(self, img, txt, run_blocks, rows):
        head, head_txt = run_blocks(img, txt, 0, 1)
        residual = head - img
        compute = []
        for name, r in zip(self.names, rows, strict=True):
            st, res = self.fbc[name], residual[r]
            if st.head_residual is None:
                c = True
            else:
                prev = st.head_residual
                c = (mx.abs(res - prev).mean() / mx.abs(prev).mean()).item() > self.config.threshold
            if c:
                st.head_residual = res
                self.full_passes[name] += 1
            compute.append(c)
        outs = self._compute(run_blocks, head, head_txt, rows, compute, 1)
        pieces = []
        for name, r, out in zip(self.names, rows, outs, strict=True):
            st = self.fbc[name]
            if out is not None:
                st.tail_residual = out - head[r]
                pieces.append(out)
            else:
                pieces.append(head[r] + st.tail_residual)
        return pieces[0] if len(pieces) == 1 else mx.concatenate(pieces)

    # MagCache: diffusers' MagCacheHeadHook / MagCacheBlockHook, per branch.
    def _mag_decide(self, name: str) -> bool:
        cfg, st = self.config, self.mag[name]
        if cfg.calibrate:
            return True
        ratios = self.ratios[name]
        scale = ratios[st.step_index] if st.step_index < len(ratios) else F32(1.0)
        retention_step = int(cfg.retention_ratio * self.mag_steps + 0.5)
        if st.step_index >= retention_step:
            st.ratio = F32(st.ratio * scale)
            st.steps += 1
            st.err = F32(st.err + abs(F32(1.0) - st.ratio))
            if (
                st.previous_residual is not None
                and st.err <= F32(cfg.threshold)
                and st.steps <= cfg.max_skip_steps
            ):
                return False
            st.reset_accumulators()
        return True

    def _mag(self, img, txt, run_blocks, rows):
        compute = [self._mag_decide(n) for n in self.names]
        outs = self._compute(run_blocks, img, txt, rows, compute, 0)
        pieces = []
        for name, r, out in zip(self.names, rows, outs, strict=True):
            st = self.mag[name]
            if out is None:
                pieces.append(img[r] + st.previous_residual)
            else:
                residual = out - img[r]
                if self.config.calibrate:
                    st.calibration.append(self._ratio(residual, st.previous_residual))
                st.previous_residual = residual
                self.full_passes[name] += 1
                pieces.append(out)
            st.step_index += 1
            if st.step_index >= self.mag_steps:  # diffusers' end-of-loop reset
                if self.config.calibrate:
                    self.calibrated[name] = list(st.calibration)
                st.__init__()
        return pieces[0] if len(pieces) == 1 else mx.concatenate(pieces)

    @staticmethod
    def _ratio(current: mx.array, previous: mx.array | None) -> float:
        if previous is None:
            return 1.0
        curr = mx.linalg.norm(current.astype(mx.float32), axis=-1)
        prev = mx.linalg.norm(previous.astype(mx.float32), axis=-1)
        return (curr / (prev + 1e-8)).mean().item()

    # TaylorSeer: diffusers' TaylorSeerCacheHook; every branch takes the same decisions.
    def _taylor_compute(self) -> bool:
        cfg = self.config
        self.step += 1
        s = self.step
        warmup = s < cfg.disable_cache_before_step
        interval = (s - cfg.disable_cache_before_step - 1) % cfg.cache_interval == 0
        cooldown = cfg.disable_cache_after_step is not None and s >= cfg.disable_cache_after_step
        return warmup or interval or cooldown

    def _state(self, key) -> TaylorState:
        st = self.taylor.get(key)
        if st is None:
            cfg = self.config
            st = self.taylor[key] = TaylorState(cfg.max_order, cfg.taylor_factors_dtype)
        return st

    def _taylor(self, model, x, *args, **kwargs):
        compute = self._taylor_compute()
        if compute:
            for n in self.names:
                self.full_passes[n] += 1
        if self.config.use_lite_mode:  # the model's output is the cached module (proj_out)
            st = self._state("proj_out")
            if not compute:
                return st.predict(self.step)[0]
            out = model(x, *args, **kwargs)
            st.update([out], self.step)
            return out

        def attention(i, attn):
            st = self._state(i)
            if not compute:
                return lambda *a: tuple(st.predict(self.step))

            def run(*a):
                out = attn(*a)
                st.update(out, self.step)
                return out

            return run

        hook = lambda img, txt, run: run(img, txt, attention=attention)[0]  # noqa: E731
        return model(x, *args, blocks_hook=hook, **kwargs)
