"""The denoising loop as a generator: one ``StepEvent`` per step.

Every caller consumes the same loop: ``pipe(...)`` (its ``callback``), the CLI's progress bar,
cancellation, the server and the multi-process modes. A ``Denoiser`` holds one run's fixed
inputs (prompt embeddings, image shapes, modulation, CFG scale, reference latents); its
``velocity(i, latents)`` is the one per-step model call, and the place to extend the step
(ControlNet residuals through ``transformer_kwargs``, step caches, a CFG split across
processes) without copying the loop.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from qwen_mlx.errors import Cancelled, NonFiniteError, RequestError
from qwen_mlx.pipelines.sampler import euler_step, true_cfg

Embeds = tuple[mx.array, mx.array | None]  # (B, T, D) float32 embeddings, (B, T) mask or None
# step_hook(step index, latents after the step) -> latents to continue from (inpaint blends here)
StepHook = Callable[[int, mx.array], mx.array]


@dataclass
class StepEvent:
    """One finished denoising step: ``index`` of ``total`` (1-based), the latents after it,
    the step's own time and the time since the loop started (seconds). ``seed`` is set by
    ``QwenImagePipeline.generate`` (the seed of the image being sampled)."""

    index: int
    total: int
    latents: mx.array
    seconds: float
    elapsed: float
    seed: int | None = None


class CancelToken:
    """Cancellation from any thread: ``cancel()``; the loop checks it before every step and
    raises ``Cancelled`` (nothing is written)."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled")


def pad_embeddings(embeds: Sequence[mx.array], masks: Sequence[mx.array | None]) -> Embeds:
    """Concatenate prompt batches along the batch axis, zero-padding to the longest with masks."""
    T = max(e.shape[1] for e in embeds)
    out_e, out_m = [], []
    for e, m in zip(embeds, masks, strict=True):
        B, t, D = e.shape
        m = mx.ones((B, t), dtype=mx.int32) if m is None else m.astype(mx.int32)
        if t < T:
            e = mx.concatenate([e, mx.zeros((B, T - t, D), dtype=e.dtype)], axis=1)
            m = mx.concatenate([m, mx.zeros((B, T - t), dtype=mx.int32)], axis=1)
        out_e.append(e)
        out_m.append(m)
    mask = mx.concatenate(out_m, axis=0)
    return mx.concatenate(out_e, axis=0), (None if bool(mask.all()) else mask)


@dataclass
class Denoiser:
    """One sampling run: the transformer, the (CFG-doubled) prompt batch and everything fixed
    across steps. ``velocity`` is the per-step model call; ``steps`` the loop."""

    model: object  # QwenImageTransformer
    prompt: Embeds
    negative: Embeds | None
    img_shapes: Sequence[tuple[int, int, int]]
    timesteps: np.ndarray  # the scheduler's timesteps (sigma * 1000), one per step
    true_cfg_scale: float = 4.0
    modulation: Sequence | None = None  # the adaLN table (None: computed from the weights)
    reference_latents: mx.array | None = None  # packed, appended after the noisy tokens (Edit)
    # extra keyword arguments of the transformer call at step i (ControlNet residuals, ...)
    transformer_kwargs: list[Callable[[int, mx.array], dict]] = field(default_factory=list)
    # a step cache (qwen_mlx.step_cache.StepCacheRun): called as step_cache(model, *args)
    step_cache: Callable | None = None
    non_finite_message: Callable[[int, int], str] | None = None
    # several processes (``qwen_mlx.distributed.CfgSplit``): this one computes one CFG branch
    cfg_split: object | None = None

    def __post_init__(self) -> None:
        batch = self.prompt[0].shape[0]
        self.batch = batch
        if self.negative is None:
            self.embeds, self.mask = self.prompt
        else:
            self.embeds, self.mask = pad_embeddings(*zip(self.prompt, self.negative, strict=True))
        self.t_in = mx.array([float(t) for t in self.timesteps], dtype=mx.float32) / 1000.0
        self.shapes = [list(self.img_shapes)] * self.embeds.shape[0]
        if self.cfg and self.cfg_split is not None:  # this process computes one branch's rows
            rows = self.cfg_split.rows(batch)  # (padded with the other branch, as one process)
            self.embeds, self.shapes = self.embeds[rows], self.shapes[rows]
            self.mask = None if self.mask is None else self.mask[rows]

    @property
    def cfg(self) -> bool:
        return self.negative is not None

    def modulation_at(self, i: int):
        """Step i's modulation: from the adaLN table, or computed once for the whole batch."""
        if self.modulation is not None:
            return self.modulation[i]
        return self.model.modulation(self.t_in[i : i + 1])

    def velocity(self, i: int, latents: mx.array) -> mx.array:
        """The flow velocity for the noisy tokens at step i: one transformer call (cond and
        uncond batched under true CFG), the reference tokens' part dropped, CFG combined."""
        L = latents.shape[1]
        x = latents
        if self.reference_latents is not None:
            x = mx.concatenate([x, self.reference_latents], axis=1)
        split = self.cfg_split if self.cfg else None  # the other branch comes in the gather
        if self.cfg and split is None:
            x = mx.concatenate([x, x])
        kwargs = {}
        for extra in self.transformer_kwargs:
            kwargs.update(extra(i, x))
        model = self.model
        if self.step_cache is not None:
            model = functools.partial(self.step_cache, model)
        v = model(
            x, self.embeds, self.mask, None, self.shapes, modulation=self.modulation_at(i), **kwargs
        )[:, :L]
        if self.cfg:
            cond, uncond = split.gather(v) if split else (v[: self.batch], v[self.batch :])
            v = true_cfg(cond, uncond, self.true_cfg_scale)
        return v

    def steps(
        self,
        latents: mx.array,
        sigmas: np.ndarray,
        step_hook: StepHook | None = None,
        cancel: CancelToken | None = None,
    ) -> Iterator[StepEvent]:
        """The loop: velocity, the Euler step in float32, ``step_hook`` (which may replace the
        latents, e.g. inpaint's blend), a finiteness check, then a ``StepEvent``. The final
        latents are the last event's."""
        if latents.shape[0] != self.batch:
            raise RequestError(f"{self.batch} prompt embeddings for {latents.shape[0]} latents")
        if self.reference_latents is not None:
            self.reference_latents = self.reference_latents.astype(latents.dtype)  # once
        n = len(self.timesteps)
        start = time.perf_counter()
        for i in range(n):
            if cancel is not None:
                cancel.check()
            t0 = time.perf_counter()
            v = self.velocity(i, latents)
            latents = euler_step(latents, v, sigmas[i], sigmas[i + 1])
            if step_hook is not None:
                latents = step_hook(i, latents)
            finite = mx.isfinite(latents).all()
            mx.eval(latents, finite)  # one sync per step for both
            if not finite.item():
                msg = self.non_finite_message or _non_finite
                raise NonFiniteError(msg(i + 1, n))
            now = time.perf_counter()
            yield StepEvent(i + 1, n, latents, now - t0, now - start)


def _non_finite(step: int, total: int) -> str:
    return f"latents became non-finite (NaN/inf) at step {step}/{total}"


def run(steps: Iterator[StepEvent], latents: mx.array, callback=None) -> mx.array:
    """Drain a step generator: the final latents (``latents`` when there are no steps),
    calling ``callback(step, total, latents)`` after each step."""
    for event in steps:
        latents = event.latents
        if callback is not None:
            callback(event.index, event.total, event.latents)
    return latents
