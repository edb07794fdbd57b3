"""End-to-end generation (encode, N denoising steps, decode): qwen-mlx vs diffusers' pipeline on
the same device in one run, with per-stage times and peak memory.

Both sides load the same tiny random checkpoint (tests/tiny_pipeline.py, converted with the real
converter) and start from the same packed noise, so the run also reports their image difference.
The tiny models make this a measure of pipeline overhead (scheduling, CFG batching, syncs,
decode path) rather than of matmul speed: scripts/bench_transformer.py covers the full-size
transformer.

    python scripts/bench_pipeline.py --size 256 --steps 8 --cfg 4
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

from _openblas import blas_in_use, preload_openblas  # scripts/ is on sys.path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def timed_method(obj, name: str, bucket: dict, key: str):
    """Wrap obj.name so its wall time accumulates in bucket[key]."""
    original = getattr(obj, name)

    def wrapper(*a, **k):
        start = time.perf_counter()
        out = original(*a, **k)
        bucket[key] = bucket.get(key, 0.0) + time.perf_counter() - start
        return out

    setattr(obj, name, wrapper)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--cfg", type=float, default=4.0)
    args = ap.parse_args()
    preload_openblas()  # re-executes once with OpenBLAS on Linux CPU
    print(f"BLAS: {blas_in_use()}")

    import mlx.core as mx
    import numpy as np
    import torch
    from helpers import convert_tiny
    from tiny_pipeline import build_checkpoint

    from qwen_mlx.pipelines.txt2img import QwenImagePipeline

    tmp = Path(tempfile.mkdtemp())
    src, ref = build_checkpoint(tmp / "hf")
    dst = convert_tiny(src, tmp / "mlx")
    L = (args.size // 8) ** 2  # tiny VAE: 4x, then 2x2 patches
    latents = torch.randn(1, L, 16, generator=torch.Generator().manual_seed(0))
    kw = dict(
        prompt="a red cube on a wooden table", negative_prompt=" ", height=args.size,
        width=args.size, num_inference_steps=args.steps, true_cfg_scale=args.cfg,
    )  # fmt: skip

    # diffusers
    stages: dict[str, float] = {}
    timed_method(ref, "encode_prompt", stages, "encode")
    timed_method(ref.vae, "decode", stages, "decode")
    with torch.no_grad():
        ref(latents=latents, output_type="np", **kw)  # warm-up
        stages.clear()
        start = time.perf_counter()
        expected = ref(latents=latents, output_type="np", **kw).images
        total_ref = time.perf_counter() - start
    stages["denoise"] = total_ref - stages["encode"] - stages["decode"]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    # qwen-mlx (components reload each call: the text encoder is freed before denoising)
    pipe = QwenImagePipeline.from_pretrained(dst)
    pipe(latents=latents.numpy(), output_type="np", **kw)  # warm-up
    mx.reset_peak_memory()
    start = time.perf_counter()
    got = pipe(latents=latents.numpy(), output_type="np", **kw)
    total = time.perf_counter() - start
    peak = mx.get_peak_memory()

    print(
        f"pipeline {args.size}x{args.size}, {args.steps} steps, true CFG {args.cfg}, tiny random "
        f"checkpoint, CPU (mlx {mx.__version__}, torch {torch.__version__})"
    )
    print(f"  {'stage':8s} {'diffusers':>10s} {'qwen-mlx':>10s} {'ratio':>7s}")
    for stage in ("encode", "denoise", "decode"):
        a, b = stages[stage], pipe.timings[stage]
        print(f"  {stage:8s} {a:9.3f}s {b:9.3f}s {b / a:6.2f}x")
    print(f"  {'total':8s} {total_ref:9.3f}s {total:9.3f}s {total / total_ref:6.2f}x")
    print(
        f"  peak memory: qwen-mlx {peak / 2**20:.1f} MiB (MLX allocations); diffusers "
        f"process max RSS {rss / 2**20:.0f} MiB (includes the Python runtime)"
    )
    print(f"  image max abs difference vs diffusers: {np.abs(got - expected).max():.2e}")


if __name__ == "__main__":
    main()
