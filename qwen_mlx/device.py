"""What machine this is: the Apple GPU generation (it picks the precision plan) and memory."""

from __future__ import annotations

import os
import re

import mlx.core as mx


def _device_info() -> dict:
    try:
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
    except Exception:  # noqa: BLE001 - no device / old MLX: treat as unknown
        return {}
    return dict(info or {})


def apple_gpu_generation(info: dict) -> int | None:
    """The M-series generation (1 = M1 ...) of an Apple GPU from MLX's device info, or None.

    MLX reports the Metal architecture name, e.g. "applegpu_g13s" (M1 Pro): G13 = M1/A14,
    G14 = M2/A15, G15 = M3, G16 = M4, G17 = M5. Falls back to "Apple M<n>" in the device name.
    """
    arch = str(info.get("architecture", "")).lower()
    m = re.search(r"applegpu_g(\d+)", arch)
    if m:
        return int(m.group(1)) - 12
    m = re.search(r"\bapple\s+m(\d+)", str(info.get("device_name", "")).lower())
    if m:
        return int(m.group(1))
    return None


def auto_precision(device_info: dict | None = None) -> tuple[str, str]:
    """(plan name, reason) for this machine, or for ``device_info`` (MLX's device_info dict).

    M1/M2 GPUs emulate bfloat16 at about half float16's speed, so they get the scaled ``fp16``
    plan; M3 and later run bfloat16 natively and get ``bf16``; anything else gets ``bf16``.
    """
    if device_info is None:
        device_info = _device_info()
    name = device_info.get("device_name") or device_info.get("architecture") or "unknown device"
    gen = apple_gpu_generation(device_info)
    if gen is None:
        return "bf16", f"{name}: not an Apple GPU, bfloat16"
    if gen <= 2:
        return "fp16", f"{name} (M{gen} family) emulates bfloat16: float16 with folded scaling"
    return "bf16", f"{name} (M{gen} family) runs bfloat16 natively"


def memory_size(device_info: dict | None = None) -> int | None:
    """Bytes of memory the model can use: the GPU's (unified memory on a Mac), else the host's."""
    info = _device_info() if device_info is None else device_info
    size = info.get("memory_size")
    if size:
        return int(size)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
