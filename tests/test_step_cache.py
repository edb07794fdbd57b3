"""Step caches against diffusers' hooks, at model level: the same decisions per CFG branch.

A small true-CFG Euler loop runs twice: diffusers' transformer with ``enable_cache`` and two
calls per step in ``cache_context("cond")`` / ``("uncond")``, and ours with both branches batched
in one call through a ``StepCacheRun``. Each side feeds back its own outputs, so the comparison
covers the whole trajectory: the same full passes per branch and the same velocities.
"""

from __future__ import annotations

import ast

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers.hooks import (
    FirstBlockCacheConfig as RefFBC,
)
from diffusers.hooks import (
    MagCacheConfig as RefMag,
)
from diffusers.hooks import (
    TaylorSeerCacheConfig as RefTaylor,
)
from diffusers.hooks.taylorseer_cache import TaylorSeerState
from helpers import convert_tiny, rel_err
from tiny_transformer import build_transformer, save_checkpoint

from qwen_mlx.errors import QwenMLXError
from qwen_mlx.models.transformer import QwenImageTransformer
from qwen_mlx.step_cache import (
    FirstBlockCacheConfig,
    MagCacheConfig,
    StepCacheRun,
    TaylorSeerCacheConfig,
    TaylorState,
    calibration_key,
    load_calibration,
    nearest_interp,
    parse_spec,
    save_calibration,
)

STEPS, H, W, T = 10, 4, 4, 6
# float32 vs float32 model outputs differ by ~1e-6 relative (summation order); a wrong decision
# (a skipped pass that diffusers computes, or the reverse) moves a velocity by > 1e-2.
TOL = 2e-5


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ref = build_transformer("deeper", std=0.1)  # 3 blocks: head, middle, tail
    # A trained model's time embedding varies smoothly with sigma; random weights on the
    # high-frequency sinusoids would change every block's modulation completely each step.
    with torch.no_grad():
        w = ref.time_text_embed.timestep_embedder.linear_1.weight  # (dim, 256): cos | sin
        w[:, :100] = 0
        w[:, 128:228] = 0
    root = save_checkpoint(ref, tmp_path_factory.mktemp("src"))
    dst = convert_tiny(root, tmp_path_factory.mktemp("conv") / "out")
    return ref, QwenImageTransformer.from_pretrained(dst / "transformer")


def _inputs():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, H * W, 16, generator=g)
    enc = torch.randn(2, T, 16, generator=g)
    mask = torch.ones(2, T)
    mask[1, T - 2 :] = 0  # the negative prompt is shorter
    return x, enc, mask


def _sigmas():
    return np.linspace(1.0, 0.0, STEPS + 1, dtype=np.float32)


def reference_loop(ref, config, cfg_scale=3.0):
    """diffusers: (velocities per step, full passes per branch)."""
    x, enc, mask = _inputs()
    counts, branch = {"cond": 0, "uncond": 0}, ["cond"]
    probe = ref.transformer_blocks[-1].attn.to_q  # runs only in a pass that computes it all
    handle = probe.register_forward_hook(
        lambda *a: counts.__setitem__(branch[0], counts[branch[0]] + 1)
    )
    ref.enable_cache(config)
    sig, vs = _sigmas(), []
    try:
        with torch.no_grad():
            for i in range(STEPS):
                t = torch.tensor([float(sig[i])])
                out = {}
                for k, name in enumerate(("cond", "uncond")):
                    branch[0] = name
                    with ref.cache_context(name):
                        out[name] = ref(x, enc[k : k + 1], mask[k : k + 1], t, [[(1, H, W)]]).sample
                v = out["uncond"] + cfg_scale * (out["cond"] - out["uncond"])
                vs.append(v.clone())
                x = x + float(sig[i + 1] - sig[i]) * v
    finally:
        ref._reset_stateful_cache()
        ref.disable_cache()
        handle.remove()
    return vs, counts


def our_loop(ours, config, cfg_scale=3.0, **run_kw):
    x, enc, mask = _inputs()
    x, enc, mask = mx.array(x.numpy()), mx.array(enc.numpy()), mx.array(mask.numpy())
    run = StepCacheRun(config, STEPS, branches=2, **run_kw)
    sig, vs = _sigmas(), []
    for i in range(STEPS):
        mod = ours.modulation(mx.array([float(sig[i])]))
        out = run(ours, mx.concatenate([x, x]), enc, mask, None, [[(1, H, W)]] * 2, modulation=mod)
        v = out[1:] + cfg_scale * (out[:1] - out[1:])
        vs.append(v)
        x = x + float(sig[i + 1] - sig[i]) * v
    return vs, run


def check_parity(pair, ours_cfg, ref_cfg, **run_kw):
    ref, ours = pair
    ref_vs, counts = reference_loop(ref, ref_cfg)
    vs, run = our_loop(ours, ours_cfg, **run_kw)
    assert run.full_passes == counts
    assert 2 < sum(counts.values()) < 2 * STEPS, counts  # some, not all, passes skipped
    for i, (a, b) in enumerate(zip(vs, ref_vs, strict=True)):
        assert rel_err(a, b) < TOL, i
    return run


@pytest.mark.parametrize("threshold", [0.084, 0.2])
def test_first_block_cache(pair, threshold):
    run = check_parity(pair, FirstBlockCacheConfig(threshold), RefFBC(threshold))
    if threshold == 0.084:  # between the branches' first diffs (0.0835, 0.0852): they part
        assert run.full_passes["cond"] != run.full_passes["uncond"]
    assert run.summary().startswith(f"fbcache:{threshold:g} ")


@pytest.mark.parametrize("lite", [False, True])
def test_taylorseer(pair, lite):
    kw = dict(cache_interval=3, disable_cache_before_step=2, max_order=2, use_lite_mode=lite)
    check_parity(
        pair,
        TaylorSeerCacheConfig(**kw, taylor_factors_dtype=mx.float32),
        RefTaylor(**kw, taylor_factors_dtype=torch.float32),
    )


RATIOS = [1.0, 1.1, 1.05, 1.02, 0.99, 1.01, 1.0, 0.97, 0.95, 0.9]


def test_mag_cache_given_ratios(pair):
    kw = dict(threshold=0.1, max_skip_steps=2, retention_ratio=0.2)
    ref = RefMag(**kw, mag_ratios=RATIOS[::2], num_inference_steps=STEPS)  # interpolated
    check_parity(pair, MagCacheConfig(**kw, mag_ratios=RATIOS[::2]), ref)


def test_mag_cache_calibration(pair, capsys):
    """Calibration measures the same ratios as diffusers (which prints them), per branch."""
    ref, ours = pair
    capsys.readouterr()
    reference_loop(ref, RefMag(calibrate=True, num_inference_steps=STEPS))
    printed = [
        ast.literal_eval(line)  # diffusers prints each context's list of floats
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("[") and not line.startswith("[MagCache]")
    ]
    _, run = our_loop(ours, MagCacheConfig(calibrate=True))
    assert run.full_passes == {"cond": STEPS, "uncond": STEPS}
    assert len(printed) == 2 and len(run.calibrated["cond"]) == STEPS
    for name, expected in zip(("cond", "uncond"), printed, strict=True):
        np.testing.assert_allclose(run.calibrated[name], expected, rtol=1e-5)
    assert run.calibrated["cond"] != run.calibrated["uncond"]

    key = calibration_key("weights", _sigmas()[:-1], branches=2)
    assert load_calibration(key) is None
    save_calibration(key, run.calibrated)
    stored = load_calibration(key)
    assert stored == run.calibrated
    # the stored ratios drive a cached run: fewer passes, same as passing them by hand
    cfg = MagCacheConfig(threshold=0.2)
    _, cached = our_loop(ours, cfg, mag_ratios=stored)
    _, by_hand = our_loop(ours, MagCacheConfig(threshold=0.2, mag_ratios=stored))
    assert cached.full_passes == by_hand.full_passes
    assert sum(cached.full_passes.values()) < 2 * STEPS


def test_mag_cache_needs_ratios():
    with pytest.raises(QwenMLXError, match="calibrate"):
        StepCacheRun(MagCacheConfig(), STEPS)


def test_nearest_interp():
    from diffusers.hooks.mag_cache import nearest_interp as ref_interp

    for n in (1, 3, 10, 28, 50):
        expected = ref_interp(torch.tensor(RATIOS), n).numpy()
        np.testing.assert_array_equal(nearest_interp(RATIOS, n), expected)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_taylor_prediction(dtype):
    """Factors and predictions equal diffusers' TaylorSeerState on the same update steps."""
    rng = np.random.default_rng(0)
    ref = TaylorSeerState(taylor_factors_dtype=getattr(torch, dtype), max_order=2)
    ours = TaylorState(max_order=2, dtype=getattr(mx, dtype))
    for step in (0, 1, 2, 5, 8):
        outs = [rng.standard_normal((2, 3, 4)).astype(np.float32) for _ in range(2)]
        ref.current_step = step
        ref.update(tuple(torch.from_numpy(o) for o in outs))
        ours.update([mx.array(o) for o in outs], step)
        for offset in (1, 2, 4):
            ref.current_step = step + offset
            for a, b in zip(ours.predict(step + offset), ref.predict(), strict=True):
                np.testing.assert_allclose(np.array(a), b.numpy(), rtol=1e-6, atol=1e-6)


def test_taylor_linear_is_exact():
    """A linear trajectory is predicted exactly by first order (and not by order 0)."""
    f = lambda s: mx.array([2.0, -1.0]) + 0.5 * s  # noqa: E731
    first, zeroth = TaylorState(1, mx.float32), TaylorState(0, mx.float32)
    for step in (0, 3):
        first.update([f(step)], step)
        zeroth.update([f(step)], step)
    assert np.allclose(np.array(first.predict(7)[0]), np.array(f(7)))
    assert not np.allclose(np.array(zeroth.predict(7)[0]), np.array(f(7)))


def test_parse_spec():
    assert parse_spec("fbcache") == FirstBlockCacheConfig()
    assert parse_spec("fbcache:0.12").threshold == 0.12
    assert parse_spec("taylorseer:4") == TaylorSeerCacheConfig(cache_interval=4)
    assert parse_spec("taylorseer-lite").use_lite_mode
    assert parse_spec("magcache:0.1", calibrate=True) == MagCacheConfig(
        threshold=0.1, calibrate=True
    )
    for bad, match in [
        ("teacache", "unknown cache"),
        ("fbcache:x", "must be a number"),
        ("fbcache:-1", ">= 0"),
        ("taylorseer:0", ">= 1"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_spec(bad)
    with pytest.raises(ValueError, match="--cache-calibrate"):
        parse_spec("fbcache", calibrate=True)
