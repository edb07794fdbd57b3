"""Flow-match Euler sampling with diffusers' FlowMatchEulerDiscreteScheduler semantics.

The schedule is computed in float32 numpy exactly as diffusers does (so sigmas and timesteps
match bit for bit); the Euler update runs in float32 MLX.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from qwen_mlx.config import ComponentConfig
from qwen_mlx.io import read_json

# Scheduler overrides for the Lightning distilled LoRAs (4 or 8 steps, CFG 1).
LIGHTNING_SCHEDULER = {
    "base_shift": math.log(3),
    "max_shift": math.log(3),
    "shift_terminal": None,
    "use_dynamic_shifting": True,
    "time_shift_type": "exponential",
}


@dataclass
class SchedulerConfig(ComponentConfig):
    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = True
    base_shift: float = 0.5
    max_shift: float = 0.9
    base_image_seq_len: int = 256
    max_image_seq_len: int = 8192
    shift_terminal: float | None = 0.02
    time_shift_type: str = "exponential"
    invert_sigmas: bool = False
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    stochastic_sampling: bool = False

    def __post_init__(self) -> None:
        unsupported = [
            k
            for k in ("invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas",
                      "use_beta_sigmas", "stochastic_sampling")
            if getattr(self, k)
        ]  # fmt: skip
        if unsupported:
            raise ValueError(f"scheduler options not supported: {unsupported}")
        if self.time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"unknown time_shift_type {self.time_shift_type!r}")

    @classmethod
    def from_pretrained(cls, folder: str | Path, **overrides) -> SchedulerConfig:
        path = Path(folder) / "scheduler_config.json"
        d = read_json(path) if path.is_file() else {}
        d.update(overrides)
        return cls.from_dict(d)


def calculate_shift(seq_len: int, cfg: SchedulerConfig) -> float:
    """mu, linear in the image-token count (diffusers' calculate_shift)."""
    m = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    return seq_len * m + (cfg.base_shift - m * cfg.base_image_seq_len)


def schedule(
    cfg: SchedulerConfig,
    num_steps: int,
    image_seq_len: int,
    sigmas: list[float] | np.ndarray | None = None,
    mu: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas with a trailing 0, length N+1; timesteps = sigma*1000, length N), float32."""
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be at least 1, got {num_steps}")
    if sigmas is None:
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    s = np.array(sigmas).astype(np.float32)
    if cfg.use_dynamic_shifting:
        mu = calculate_shift(image_seq_len, cfg) if mu is None else mu
        if cfg.time_shift_type == "exponential":
            s = math.exp(mu) / (math.exp(mu) + (1 / s - 1) ** 1.0)
        else:
            s = mu / (mu + (1 / s - 1) ** 1.0)
    else:
        s = cfg.shift * s / (1 + (cfg.shift - 1) * s)
    if cfg.shift_terminal and s[-1] < 1:  # a lone sigma of 1 cannot be stretched (diffusers: NaN)
        one_minus = 1 - s
        s = 1 - one_minus / (one_minus[-1] / (1 - cfg.shift_terminal))
    s = s.astype(np.float32)
    timesteps = (s * np.float32(cfg.num_train_timesteps)).astype(np.float32)
    return np.concatenate([s, np.zeros(1, np.float32)]), timesteps


def euler_step(latents: mx.array, velocity: mx.array, sigma: float, sigma_next: float) -> mx.array:
    """x + (sigma_next - sigma) * v, in float32."""
    dt = np.float32(sigma_next) - np.float32(sigma)
    return latents.astype(mx.float32) + float(dt) * velocity.astype(mx.float32)


def true_cfg(cond: mx.array, uncond: mx.array, scale: float) -> mx.array:
    """neg + s*(cond - neg), rescaled per token to the norm of cond (no epsilon, as diffusers)."""
    comb = uncond + scale * (cond - uncond)
    cond_norm = mx.linalg.norm(cond, axis=-1, keepdims=True)
    comb_norm = mx.linalg.norm(comb, axis=-1, keepdims=True)
    return comb * (cond_norm / comb_norm)
