"""Qwen-Image-Edit: the vision tower and the whole Edit call, qwen-mlx vs the references on the
same device in one run, with peak memory and the output difference.

1. Vision tower: Qwen2.5-VL's ViT at full width (hidden 1280, 16 heads, MLP 3420, merger to
   3584) with ``--depth`` blocks (the last one full attention, the others windowed, as every
   8th block of the real 32), random weights, on one image of ``--size`` pixels square through
   the real preprocessing (1024 -> 1036x1036 = 5476 patches, the Edit size; 384 -> 392x392, the
   2509/2511 size). transformers' ``Qwen2_5_VisionTransformerPretrainedModel`` vs ours.
2. Edit call: the tiny random Edit checkpoint of the tests (tests/tiny_edit.py, converted with
   the real converter), diffusers' pipeline vs ours from the same packed noise, with the image
   areas shrunk to ``--area`` (the tiny VAE downsamples 4x, not 8x). ``--flavour plus`` runs
   Edit-2511 with two input images, ``edit`` Qwen-Image-Edit with one. Tiny models measure the
   pipeline's own overhead (sizing, preprocessing, VAE encode, prompt encoding, CFG batching).

    python scripts/bench_edit.py                       # tower 4 blocks at 512, 2511 call at 256
    python scripts/bench_edit.py --size 1024 --depth 8 --dtype bfloat16

Times are medians after a warm-up. Memory: MLX's own peak (mx.get_peak_memory) for qwen-mlx;
the process's max RSS for the reference (it includes the Python runtime and the models), so the
reference runs first.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _openblas import blas_in_use, preload_openblas  # scripts/ is on sys.path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def median_time(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def _reference_tower(args, vision: dict, pixels, grid):
    """(time, features, max RSS, weights as MLX arrays) of transformers' tower on random
    weights; the torch model is gone when this returns."""
    import mlx.core as mx
    import torch
    from transformers import Qwen2_5_VLConfig
    from transformers.initialization import no_init_weights
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionTransformerPretrainedModel,
    )

    cfg = Qwen2_5_VLConfig(vision_config=vision).vision_config
    torch_dtype = getattr(torch, args.dtype)
    with no_init_weights():
        ref = Qwen2_5_VisionTransformerPretrainedModel(cfg).eval().to(torch_dtype)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            norm = "norm" in name or "ln_q" in name
            p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if norm else 0.02) + float(norm))
    px, grid_t = torch.from_numpy(pixels).to(torch_dtype), torch.from_numpy(grid)

    def run():
        with torch.inference_mode():
            return ref(px, grid_thw=grid_t).pooler_output

    t = median_time(run, 1, args.iters)
    expected = run().float()
    weights = {f"visual.{k}": mx.array(v.float().numpy()) for k, v in ref.state_dict().items()}
    return t, expected, rss_mib(), weights


def bench_tower(args) -> None:
    import mlx.core as mx
    import numpy as np
    from helpers import rel_err
    from PIL import Image

    from qwen_mlx.image_processing import ImageProcessor
    from qwen_mlx.models.vision import VisionTransformer

    vision = dict(
        depth=args.depth, hidden_size=1280, num_heads=16, intermediate_size=3420,
        out_hidden_size=3584, window_size=112, fullatt_block_indexes=[args.depth - 1],
    )  # fmt: skip
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8))
    # The released processor/ config's limits (Qwen2.5-VL's preprocessor_config.json).
    pixels, grid = ImageProcessor(min_pixels=3136, max_pixels=12845056)(image)
    print(
        f"\nvision tower: hidden 1280, {args.depth} blocks (full attention in the last), "
        f"{args.dtype}; image {args.size}px -> {grid[0, 1] * 14}px, {len(pixels)} patches, "
        f"{len(pixels) // 4} tokens"
    )
    t_ref, expected, ref_mem, weights = _reference_tower(args, vision, pixels, grid)

    ours = VisionTransformer.from_weights(vision, weights, dtype=args.dtype)
    del weights
    px_m = mx.array(pixels)
    mx.reset_peak_memory()

    def run_ours():
        out = ours(px_m, grid)
        mx.eval(out)
        return out

    t_ours = median_time(run_ours, 1, args.iters)
    got = run_ours()
    peak = mx.get_peak_memory() / 2**20
    print(f"  transformers: {t_ref * 1000:9.1f} ms   process max RSS {ref_mem:.0f} MiB")
    print(f"  qwen-mlx:     {t_ours * 1000:9.1f} ms   MLX peak {peak:.0f} MiB (weights included)")
    print(f"  ratio (qwen-mlx / transformers): {t_ours / t_ref:.2f}x")
    print(f"  features {tuple(got.shape)}, rel err vs transformers {rel_err(got, expected):.1e}")


def bench_call(args) -> None:
    import mlx.core as mx
    import numpy as np
    import tiny_edit
    import torch
    from helpers import convert_tiny
    from PIL import Image
    from tiny_edit import build_edit_checkpoint

    from qwen_mlx.pipelines.edit import QwenImageEditPipeline

    tiny_edit.TEST_VAE_AREA = args.area**2
    tiny_edit.TEST_CONDITION_AREA = (args.area * 3 // 8) ** 2  # 384/1024 of the side, as released

    class Patch:  # monkeypatch stand-in for tiny_edit.shrink_reference_areas
        def setattr(self, obj, name, value):
            setattr(obj, name, value)

    tiny_edit.shrink_reference_areas(Patch())
    tmp = Path(tempfile.mkdtemp())
    plus = args.flavour == "plus"
    src, ref = build_edit_checkpoint(tmp / "hf", "plus" if plus else "edit", zero_cond_t=plus)
    dst = convert_tiny(src, tmp / "mlx")
    rng = np.random.default_rng(0)
    sizes = [(args.area * 5 // 4, args.area * 3 // 4), (args.area * 2 // 3, args.area)]
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for w, h in (sizes if plus else sizes[:1])
    ]
    pipe = QwenImageEditPipeline.from_pretrained(dst)
    pipe.vae_image_area, pipe.condition_image_area = args.area**2, tiny_edit.TEST_CONDITION_AREA
    h, w = pipe.edit_size(images, None, None)
    L = (h // pipe.vae_scale // 2) * (w // pipe.vae_scale // 2)
    noise = torch.randn(1, L, 16, generator=torch.Generator().manual_seed(0))
    kw = dict(prompt="put the hat on the cat", negative_prompt=" ", true_cfg_scale=4.0)
    kw["num_inference_steps"] = args.steps
    image_arg = images if plus else images[0]
    print(
        f"\nEdit call ({pipe.flavour}, tiny random checkpoint): {len(images)} image(s), output "
        f"{w}x{h}, {args.steps} steps, true CFG 4"
    )

    def run_ref():
        with torch.no_grad():
            return ref(image=image_arg, latents=noise, output_type="np", **kw).images

    t_ref = median_time(run_ref, 1, args.iters)
    expected = run_ref()
    ref_mem = rss_mib()

    def run_ours():
        pipe._prompts.clear()  # time the whole call: no cached prompt or references
        pipe._references = None
        return pipe(image_arg, latents=noise.numpy(), output_type="np", **kw)

    run_ours()
    mx.reset_peak_memory()
    t_ours = median_time(run_ours, 0, args.iters)
    got = run_ours()
    peak = mx.get_peak_memory() / 2**20
    stages = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in pipe.timings.items())
    print(f"  diffusers: {t_ref * 1000:9.1f} ms   process max RSS {ref_mem:.0f} MiB")
    print(f"  qwen-mlx:  {t_ours * 1000:9.1f} ms   MLX peak {peak:.0f} MiB   ({stages})")
    print(f"  ratio (qwen-mlx / diffusers): {t_ours / t_ref:.2f}x")
    print(f"  image max abs difference vs diffusers: {np.abs(got - expected).max():.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--part", choices=["tower", "call", "both"], default="both")
    ap.add_argument("--size", type=int, default=512, help="tower: input image side (pixels)")
    ap.add_argument("--depth", type=int, default=4, help="tower: blocks (the real model: 32)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--flavour", choices=["edit", "plus"], default="plus")
    ap.add_argument("--area", type=int, default=256, help="call: VAE image side (pixels)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--iters", type=int, default=2)
    args = ap.parse_args()
    preload_openblas()  # re-executes once with OpenBLAS on Linux CPU
    import mlx.core as mx
    import torch

    print(f"BLAS: {blas_in_use()}")
    print(f"mlx {mx.__version__} on {mx.default_device()}, torch {torch.__version__} on cpu")
    if args.part in ("tower", "both"):
        bench_tower(args)
    if args.part in ("call", "both"):
        bench_call(args)


if __name__ == "__main__":
    main()
