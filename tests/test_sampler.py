"""Sampler parity with diffusers' FlowMatchEulerDiscreteScheduler and QwenImagePipeline."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift as ref_shift
from helpers import RELEASED_SCHEDULER

from qwen_mlx.pipelines.sampler import (
    LIGHTNING_SCHEDULER,
    SchedulerConfig,
    calculate_shift,
    euler_step,
    schedule,
    true_cfg,
)

RELEASED = RELEASED_SCHEDULER


def reference(config: dict, steps: int, seq_len: int, sigmas=None):
    sched = FlowMatchEulerDiscreteScheduler(**config)
    mu = ref_shift(
        seq_len, config["base_image_seq_len"], config["max_image_seq_len"],
        config["base_shift"], config["max_shift"],
    )  # fmt: skip
    if sigmas is None:
        sigmas = np.linspace(1.0, 1 / steps, steps)
    sched.set_timesteps(sigmas=sigmas, mu=mu)
    return sched


@pytest.mark.parametrize("steps", [2, 4, 8, 20, 50])
@pytest.mark.parametrize("seq_len", [16, 256, 4096, 6912, 8192])
def test_schedule_equals_diffusers(steps, seq_len):
    ref = reference(RELEASED, steps, seq_len)
    sigmas, timesteps = schedule(SchedulerConfig.from_dict(RELEASED), steps, seq_len)
    np.testing.assert_array_equal(sigmas, ref.sigmas.numpy())
    np.testing.assert_array_equal(timesteps, ref.timesteps.numpy())


def test_reference_numbers_at_1024():
    cfg = SchedulerConfig.from_dict(RELEASED)
    assert calculate_shift(4096, cfg) == pytest.approx(0.693548, abs=1e-6)
    sigmas, _ = schedule(cfg, 50, 4096)
    np.testing.assert_allclose(sigmas[:3], [1.0, 0.98970, 0.97919], atol=1e-5)
    np.testing.assert_allclose(sigmas[-3:], [0.05848, 0.02, 0.0], atol=1e-5)


def test_lightning_and_custom_sigmas():
    config = {**RELEASED, **LIGHTNING_SCHEDULER}
    custom = [1.0, 0.8, 0.5, 0.25]
    ref = reference(config, 4, 4096, sigmas=custom)
    sigmas, timesteps = schedule(SchedulerConfig.from_dict(config), 4, 4096, sigmas=custom)
    assert calculate_shift(123, SchedulerConfig.from_dict(config)) == pytest.approx(math.log(3))
    np.testing.assert_array_equal(sigmas, ref.sigmas.numpy())
    np.testing.assert_array_equal(timesteps, ref.timesteps.numpy())


def test_one_step_is_finite():
    sigmas, _ = schedule(SchedulerConfig.from_dict(RELEASED), 1, 4096)
    np.testing.assert_array_equal(sigmas, [1.0, 0.0])  # diffusers yields NaN here


def test_bad_steps_and_options():
    with pytest.raises(ValueError, match="at least 1"):
        schedule(SchedulerConfig(), 0, 16)
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        SchedulerConfig.from_dict({"use_karras_sigmas": True})


def test_euler_step_equals_diffusers():
    ref = reference(RELEASED, 4, 256)
    sigmas, timesteps = schedule(SchedulerConfig.from_dict(RELEASED), 4, 256)
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 16, 64, generator=g), torch.randn(2, 16, 64, generator=g)
    ref.set_begin_index(0)
    expected = ref.step(v, ref.timesteps[0], x, return_dict=False)[0]
    got = euler_step(mx.array(x.numpy()), mx.array(v.numpy()), sigmas[0], sigmas[1])
    np.testing.assert_allclose(np.array(got), expected.numpy(), rtol=0, atol=1e-6)


def test_true_cfg_equals_diffusers_formula():
    g = torch.Generator().manual_seed(1)
    cond, neg = torch.randn(2, 16, 64, generator=g), torch.randn(2, 16, 64, generator=g)
    comb = neg + 4.0 * (cond - neg)
    expected = comb * (
        torch.norm(cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True)
    )
    got = true_cfg(mx.array(cond.numpy()), mx.array(neg.numpy()), 4.0)
    np.testing.assert_allclose(np.array(got), expected.numpy(), rtol=1e-5, atol=1e-6)
    # per-token norm equals the conditional prediction's norm
    np.testing.assert_allclose(
        np.linalg.norm(np.array(got), axis=-1), torch.norm(cond, dim=-1).numpy(), rtol=1e-5
    )
